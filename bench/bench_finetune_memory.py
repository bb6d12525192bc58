"""Peak activation memory of training one 1024-token sequence: coserve against PEFT.

    .venv/bin/python bench/bench_finetune_memory.py

Three ways to train one sequence of the default model (float32, LoRA rank 16 on all
seven projections, loss on every token), each in a fresh process:
  peft            transformers + peft, plain autograd over the whole sequence;
  peft-ckpt       the same with gradient checkpointing (one layer's graph at a time);
  coserve         our engine: forward in the flat batch keeping only layer inputs,
                  backward layer by layer from the top, loss in row chunks.
Activation memory = peak resident memory during the step minus resident memory
just before it (model, KV cache and optimizer already in place), read from
/proc/self/status (VmHWM is reset through /proc/self/clear_refs before the step),
with glibc's mmap threshold lowered so that freed tensors leave resident memory.
Writes bench/results/<date>-<time>-finetune-memory.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEQ_LEN = 1024
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULT = "MEMORY_RESULT "
# glibc keeps freed heap memory resident below this size; with a 64 KiB threshold every
# tensor-sized block is mmap'd and returned on free, so resident memory tracks what is
# live, for all three modes alike.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _tokens(vocab: int) -> list[int]:
    import torch

    return torch.randint(3, vocab, (SEQ_LEN,), generator=torch.Generator().manual_seed(0)).tolist()


def measure_peft(model_dir: Path, checkpointing: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    model.train()
    ids = torch.tensor([_tokens(model.config.vocab_size)])
    before = _rss_kib("VmRSS")
    _reset_peak()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return {"peak_activation_mib": (_rss_kib("VmHWM") - before) / 1024, "loss": loss.item()}


def measure_coserve(model_dir: Path) -> dict:
    import torch

    from engine.block_manager import BlockManager
    from engine.finetune.backward_work import BackwardAllowance
    from engine.finetune.coordinator import FinetuneCoordinator
    from engine.finetune.job import FinetuneJob, Hyperparameters, TrainingExample
    from engine.finetune.lora_params import LoRAConfig
    from engine.lora.manager import LoRAManager
    from engine.model.loader import load_model
    from engine.runner import ModelRunner
    from engine.scheduler import Scheduler

    model = load_model(model_dir, torch.float32)
    layout = model.lora_layout()
    loras = LoRAManager(layout, max_loras=1, max_cpu_loras=1, max_rank=16, dtype=torch.float32, device="cpu")
    blocks = BlockManager(num_blocks=SEQ_LEN // 16 + 1, block_size=16)
    runner = ModelRunner(model, blocks.num_blocks, 16, SEQ_LEN + 16, "cpu", lora_backend=loras.backend)
    scheduler = Scheduler(blocks, 512, 8, SEQ_LEN + 16, eos_token_ids=[], adapter_slots=loras)
    coordinator = FinetuneCoordinator(loras, scheduler, backward_layers_per_iteration=4)
    example = TrainingExample(_tokens(model.config.vocab_size), [False] + [True] * (SEQ_LEN - 1))
    job = FinetuneJob("mem", model, layout, [example], Hyperparameters(n_epochs=1, batch_size=1),
                      LoRAConfig(rank=16, alpha=32, target_modules=tuple(TARGETS)))
    coordinator.add_job(job)
    before = _rss_kib("VmRSS")
    _reset_peak()
    while not job.done:
        coordinator.before_schedule()
        plan = scheduler.schedule(finetune_budget=lambda plan, left: left)
        result = runner.execute(plan)
        coordinator.after_forward(plan, result.captured)
        scheduler.update(plan, result.sampled)
        coordinator.run_backward(BackwardAllowance(max_layers=coordinator.backward_layers_per_iteration))
    return {"peak_activation_mib": (_rss_kib("VmHWM") - before) / 1024, "loss": job.events[0].loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("peft", "peft-ckpt", "coserve"), help="internal: measure one mode")
    args = ap.parse_args()
    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, REPO / "bench" / ".work")
    if args.mode:
        run = {"peft": lambda: measure_peft(model_dir, False), "peft-ckpt": lambda: measure_peft(model_dir, True),
               "coserve": lambda: measure_coserve(model_dir)}[args.mode]
        print(RESULT + json.dumps(run()), flush=True)
        return
    from bench.bench_serving import machine_info

    started = dt.datetime.now()
    results = {"date": started.isoformat(timespec="seconds"), "command": shlex.join(["python", *sys.argv]),
               "machine": machine_info(), "model": name, "seq_len": SEQ_LEN, "modes": {}}
    for mode in ("peft", "peft-ckpt", "coserve"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **MALLOC_ENV})
        line = next(line for line in out.stdout.splitlines() if line.startswith(RESULT))
        results["modes"][mode] = json.loads(line[len(RESULT):])
        print(mode, results["modes"][mode], flush=True)
    modes = results["modes"]
    ratio = modes["coserve"]["peak_activation_mib"] / modes["peft"]["peak_activation_mib"]
    results["coserve_over_peft"] = ratio
    stem = REPO / "bench" / "results" / (started.strftime("%Y-%m-%d-%H%M%S") + "-finetune-memory")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    md = [
        f"# Finetuning activation memory, {results['date']}", "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores. torch {m['torch']}, coserve {m['coserve_commit']}. "
        f"Model {name}, float32, one {SEQ_LEN}-token sequence, LoRA r=16 on all projections.", "",
        f"Command: `{results['command']}`", "",
        "| mode | peak activation MiB | vs peft | loss |", "|---|---:|---:|---:|",
    ]
    for mode, r in modes.items():
        md.append(f"| {mode} | {r['peak_activation_mib']:.0f} | "
                  f"{r['peak_activation_mib'] / modes['peft']['peak_activation_mib']:.2f} | {r['loss']:.3f} |")
    md += ["", f"Target: coserve at most 1/4 of peft without checkpointing: "
               f"{'met' if ratio <= 0.25 else 'not met'} ({ratio:.2f})."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
