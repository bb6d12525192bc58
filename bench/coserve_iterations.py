"""Where a co-served iteration's time goes: iterations grouped by what they carried.

One command, from the repository root:

    .venv/bin/python bench/coserve_iterations.py [--rate 0.25] [--seconds 90]

Drives LLMEngine directly (no server) on the default model: a finetuning job of 64
made-up examples (120-200 tokens, 60-130 of them trained; LoRA rank 16 on all seven
projections, --batch-size examples per optimizer step) while inference requests of 128 prompt x 128 output tokens
arrive as a Poisson process at --rate. After a 20 s warm-up it records each
iteration's measured and predicted time and its composition, then prints the
finetuning throughput and, per kind of iteration (D decodes, P prefill chunks,
F finetuning forward tokens, B backward layer-tokens, L loss-head tokens), how many there were, the time
they took and what they carried. It shows whether the TPOT budget, the configured
backward slice or mispredicted work bounds the finetuning share.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_serving import result_header  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.finetune.job import FinetuneJob, Hyperparameters, TrainingExample  # noqa: E402
from engine.finetune.lora_params import LoRAConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.messages import EngineRequest, SamplingParams  # noqa: E402
from engine.model_files import resolve_model  # noqa: E402

WARMUP_S = 20.0
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_job(engine: LLMEngine, rng: random.Random, batch_size: int) -> FinetuneJob:
    examples = []
    for _ in range(64):
        length = rng.randint(120, 200)
        trained = rng.randint(60, 130)
        ids = [rng.randint(100, engine.model.config.vocab_size - 1) for _ in range(length)]
        examples.append(TrainingExample(ids, [False] * (length - trained) + [True] * trained))
    return FinetuneJob("probe", engine.model, engine.loras.layout, examples,
                       Hyperparameters(n_epochs=3, batch_size=batch_size, learning_rate=1e-3),
                       LoRAConfig(rank=16, alpha=32, target_modules=ALL_PROJECTIONS), seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=0.25, help="inference requests per second")
    parser.add_argument("--seconds", type=float, default=90.0, help="run time, warm-up included")
    parser.add_argument("--tpot-slo-ms", type=float, default=200.0)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step (the server's auto)")
    parser.add_argument("--backward-layers", type=int, default=8, help="finetune_backward_layers_per_iteration")
    args = parser.parse_args()

    started = dt.datetime.now()
    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    model_dir, model_name = resolve_model(None, cache)
    engine = LLMEngine(EngineConfig(model_dir=model_dir, tpot_slo_ms=args.tpot_slo_ms,
                                    finetune_backward_layers_per_iteration=args.backward_layers))
    rng = random.Random(0)
    job = make_job(engine, rng, args.batch_size)
    engine.finetune.add_job(job)
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    start = time.time()
    next_arrival = start + rng.expovariate(args.rate) if args.rate > 0 else float("inf")
    rows, baseline, request = [], None, 0
    while time.time() - start < args.seconds:
        now = time.time()
        if now >= next_arrival:
            prompt = [rng.randint(100, engine.model.config.vocab_size - 1) for _ in range(128)]
            engine.add_request(EngineRequest(f"r{request}", prompt, params, now))
            request += 1
            next_arrival += rng.expovariate(args.rate)
        _, stats = engine.step()
        if time.time() - start < WARMUP_S:
            continue
        if baseline is None:
            baseline = (job.tokens_trained, time.time())
        rows.append((stats.iteration_seconds, stats.predicted_seconds, stats.decode_tokens, stats.prefill_tokens,
                     stats.finetune_forward_tokens, stats.finetune_backward_layer_tokens, stats.finetune_loss_tokens))

    trained_per_s = (job.tokens_trained - baseline[0]) / (time.time() - baseline[1])
    table = np.array(rows)
    costs = engine.finetune.backward_costs
    print(json.dumps(result_header(started, model_name)))
    print(f"\nrate {args.rate} req/s, TPOT SLO {args.tpot_slo_ms:g} ms, batch size {args.batch_size}, "
          f"backward slice {args.backward_layers} layers: "
          f"finetuning {trained_per_s:.1f} trained tok/s; {len(table)} iterations, mean {table[:, 0].mean() * 1e3:.0f} "
          f"ms measured, {table[:, 1].mean() * 1e3:.0f} ms predicted; backward units as timed: "
          f"{costs.per_layer_token(prior=float('nan')) * 1e6:.0f} us per layer-token, "
          f"{costs.per_loss_token(prior=float('nan')) * 1e6:.0f} us per loss-head token\n")
    groups = defaultdict(list)
    for row in table:
        kind = "".join(letter for letter, amount in zip("DPFBL", row[2:]) if amount) or "-"
        groups[kind].append(row)
    print("| kind | iterations | seconds | mean ms | predicted ms | decodes | finetune fwd tokens | backward layer-tokens "
          "| loss-head tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, group in sorted(groups.items(), key=lambda item: -len(item[1])):
        g = np.array(group)
        print(f"| {kind} | {len(g)} | {g[:, 0].sum():.1f} | {g[:, 0].mean() * 1e3:.0f} | {g[:, 1].mean() * 1e3:.0f} "
              f"| {g[:, 2].mean():.1f} | {g[:, 4].mean():.0f} | {g[:, 5].mean():.0f} | {g[:, 6].mean():.0f} |")


if __name__ == "__main__":
    main()
