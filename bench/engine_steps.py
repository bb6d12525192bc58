"""Engine step times of the default model, in process, at 1 to 128 sequences.

    .venv/bin/python bench/engine_steps.py [--sequences 1,8,32,64,128] [--temperature 1.0]

For each count N: N requests of 128 random prompt tokens are prefilled together (the
prefill rate is their tokens over the steps that prefilled them), then decoded for
--decode-steps steps; prints the median decode step and its token rate. The engine runs
with the server's defaults (dtype auto: the CPU GEMM probe decides) and max_num_seqs at
the largest N. No server, no sampling of load: this isolates the engine iteration from
HTTP, detokenization and the load generator. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default="1,8,32,64,128")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--decode-steps", type=int, default=40)
    ap.add_argument("--cache-dir", type=Path, default=Path("~/.cache/coserve").expanduser())
    args = ap.parse_args()

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.messages import EngineRequest, SamplingParams
    from engine.model_files import resolve_model

    counts = [int(n) for n in args.sequences.split(",")]
    model_dir, name = resolve_model(None, args.cache_dir)
    engine = LLMEngine(EngineConfig(model_dir=model_dir, max_num_seqs=max(counts), cache_dir=args.cache_dir))
    params = SamplingParams(max_tokens=args.decode_steps + 2, temperature=args.temperature, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    print(f"{name}, dtype {engine.dtype}, bfloat16 panels up to {engine.panel_rows} rows, "
          f"{torch.get_num_threads()} threads, temperature {args.temperature}")
    print("| sequences | prefill tok/s | decode step ms (median) | decode tok/s |\n|---:|---:|---:|---:|")
    for n in counts:
        for i in range(n):
            prompt = torch.randint(100, 40000, (128,), generator=gen).tolist()
            engine.add_request(EngineRequest(f"{n}-{i}", prompt, params, arrival_time=time.time()))
        started = time.perf_counter()
        while any(seq.num_output_tokens == 0 for seq in engine.sequences.values()):
            engine.step()
        prefill_s = time.perf_counter() - started
        steps = []
        while engine.has_work():
            started = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - started)
        step = statistics.median(steps[:-1])  # the last step finishes the sequences: shorter
        print(f"| {n} | {n * 128 / prefill_s:.0f} | {step * 1000:.1f} | {n / step:.0f} |", flush=True)


if __name__ == "__main__":
    main()
