"""One offline-throughput run of one backend; prints one `BENCH_RESULT {json}` line.

Run by bench_serving.py in a fresh subprocess per backend (each with its own
interpreter: coserve's venv or vLLM's), so the two never share threads or memory:

    python -m bench.offline --backend coserve|vllm --model-dir DIR --prompts FILE.json --output-len 128 \
        [--lora-root DIR --adapters FILE.json --max-loras N]

The prompts file holds a JSON list of token-id lists; the optional adapters file a
list of the same length naming each prompt's LoRA adapter (a directory under
--lora-root) or null for the base model. Throughput counts generated tokens over the
generation wall time; model load and a short warm-up are excluded.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

RESULT_PREFIX = "BENCH_RESULT "


@dataclass
class Loras:
    root: Path | None
    per_prompt: list[str | None]  # adapter of each prompt, None = base model
    max_loras: int
    max_rank: int = 16

    @property
    def names(self) -> list[str]:
        return sorted({n for n in self.per_prompt if n})


def run_coserve(model_dir: str, prompts: list[list[int]], output_len: int, dtype: str, loras: "Loras") -> dict:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.messages import EngineRequest, SamplingParams

    modules = tuple((name, str(loras.root / name)) for name in loras.names)
    config = EngineConfig(
        model_dir=Path(model_dir), dtype=dtype, lora_modules=modules,
        max_loras=loras.max_loras, max_cpu_loras=max(loras.max_loras, 32),
    )
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    def generate(batch: list[list[int]], tag: str) -> int:
        for i, ids in enumerate(batch):
            request = EngineRequest(f"{tag}-{i}", ids, params, arrival_time=time.time(), lora_name=loras.per_prompt[i])
            engine.add_request(request)
        generated = 0
        while engine.has_work():
            outputs, _stats = engine.step()
            generated += sum(len(o.new_token_ids) for o in outputs)
        return generated

    generate(prompts[:2], "warmup")
    start = time.perf_counter()
    generated = generate(prompts, "bench")
    return {"generated_tokens": generated, "seconds": time.perf_counter() - start}


def run_vllm(model_dir: str, prompts: list[list[int]], output_len: int, dtype: str, loras: "Loras") -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora_options = {}
    if loras.names:
        lora_options = dict(enable_lora=True, max_loras=loras.max_loras, max_cpu_loras=loras.max_loras,
                            max_lora_rank=loras.max_rank)
    llm = LLM(model=model_dir, dtype=dtype, seed=0, **lora_options)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    ids = {name: i + 1 for i, name in enumerate(loras.names)}
    requests = [
        LoRARequest(name, ids[name], str(loras.root / name)) if name else None for name in loras.per_prompt
    ]

    def generate(batch: list[list[int]]) -> int:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False,
                            lora_request=requests[: len(batch)] if loras.names else None)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    generate(prompts[:2])
    start = time.perf_counter()
    generated = generate(prompts)
    return {"generated_tokens": generated, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("coserve", "vllm"), required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--output-len", type=int, default=128)
    # coserve's `auto` (what its CPU GEMM probe measured fastest); vLLM-CPU gets the same
    # type from bench_serving (peer_dtype), which this vLLM-side process cannot measure.
    ap.add_argument("--dtype", default=None, help="default for coserve: auto; required for vllm")
    ap.add_argument("--lora-root", type=Path)
    ap.add_argument("--adapters", help="JSON list: each prompt's adapter name under --lora-root, or null")
    ap.add_argument("--max-loras", type=int, default=8)
    args = ap.parse_args()
    if args.backend == "vllm" and args.dtype is None:
        ap.error("--dtype is required with --backend vllm")
    with open(args.prompts) as f:
        prompts = json.load(f)
    per_prompt = [None] * len(prompts)
    if args.adapters:
        with open(args.adapters) as f:
            per_prompt = json.load(f)
    loras = Loras(args.lora_root, per_prompt, args.max_loras)
    run = run_coserve if args.backend == "coserve" else run_vllm
    dtype = args.dtype or "auto"
    result = run(args.model_dir, prompts, args.output_len, dtype, loras)
    result.update(
        backend=args.backend,
        dtype=dtype,
        num_prompts=len(prompts),
        prompt_tokens=sum(map(len, prompts)),
        output_len=args.output_len,
        output_tokens_per_s=result["generated_tokens"] / result["seconds"],
    )
    # Engines log to stdout too; the prefix marks the one line that is the result.
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
