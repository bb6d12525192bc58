"""Multi-LoRA benchmark: throughput with 1, 8 and 32 adapters against the base model alone.

One command, from the repository root (vLLM's venv first: `bash bench/setup_vllm.sh`):

    .venv/bin/python bench/bench_lora.py

Adapters: 32 random rank-16 PEFT adapters of the default model on all seven
projections (q/k/v/o/gate/up/down), made by peft (bench/.work/adapters-r16).
Each scenario assigns the prompts to adapters with a seeded RNG:
  uniform   every adapter equally likely;
  skewed    Zipf-like popularity, adapter k drawn with weight 1 / (k + 1);
with `max_loras` equal to the number of adapters (all resident), for both backends.
  * offline: the 32 prompts x 128 output tokens of bench_serving.py, in-process;
  * online: 32 streaming requests of 128 + 128 tokens, Poisson at --rate req/s,
    each naming its adapter as `model`.
Writes bench/results/<date>-<time>-lora.json and .md (machine, versions, command).
Options: --skip-vllm, --only offline|online, --rate 1, --scenarios base,8-uniform,...
Runtime on 2 cores: about 40 minutes with vLLM, 15 without.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_serving import (  # noqa: E402
    BENCH, VLLM_ENV, VLLM_VENV, WORK, bind_vllm_threads_to_all_cores, offline, online, peer_dtype, result_header,
)
from bench.prompts import make_prompts  # noqa: E402

RANK = 16
NUM_ADAPTERS = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCENARIOS = ["base", "1-uniform", "8-uniform", "8-skewed", "32-uniform", "32-skewed"]


def make_adapters(model_dir: Path, root: Path) -> None:
    from tests.peft_adapters import write_peft_adapter

    for i in range(NUM_ADAPTERS):
        if not (root / f"a{i}" / "adapter_model.safetensors").exists():
            write_peft_adapter(model_dir, root / f"a{i}", seed=i, b_scale=0.1, r=RANK, lora_alpha=2 * RANK,
                               target_modules=TARGETS)


def assign(scenario: str, num_prompts: int, seed: int) -> tuple[list[str | None], int]:
    """(adapter name per prompt, number of adapters) for a scenario such as "8-skewed"."""
    if scenario == "base":
        return [None] * num_prompts, 0
    count, popularity = scenario.split("-")
    n = int(count)
    weights = [1.0 / (k + 1) for k in range(n)] if popularity == "skewed" else [1.0] * n
    rng = random.Random(seed)
    return [f"a{rng.choices(range(n), weights)[0]}" for _ in range(num_prompts)], n


def lora_server_args(backend: str, root: Path, names: list[str], n: int) -> tuple[str, ...]:
    if not names:
        return ()
    modules = [f"{name}={root / name}" for name in names]
    if backend == "coserve":
        return ("--lora-modules", *modules, "--max-loras", str(n), "--max-cpu-loras", str(max(n, 32)))
    return ("--enable-lora", "--lora-modules", *modules, "--max-loras", str(n), "--max-cpu-loras", str(n),
            "--max-lora-rank", str(RANK))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--only", choices=("offline", "online"))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--rate", type=float, default=1.0, help="online request rate (req/s)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8331)
    ap.add_argument("--quiet-wait", type=float, default=10)
    args = ap.parse_args()
    bind_vllm_threads_to_all_cores()
    backends = ["coserve"] + ([] if args.skip_vllm else ["vllm"])
    if "vllm" in backends and not (VLLM_VENV / "bin/vllm").exists():
        sys.exit("vLLM is not installed: run `bash bench/setup_vllm.sh` first, or pass --skip-vllm")
    (WORK / "logs").mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, WORK)
    root = WORK / f"adapters-r{RANK}"
    make_adapters(model_dir, root)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = dt.datetime.now()
    results: dict = {
        **result_header(started, name),
        "settings": vars(args),
        "vllm_env": dict(VLLM_ENV),
        "vllm_dtype": peer_dtype(model_dir),
        "scenarios": {},
    }
    offline_ids = make_prompts(tokenizer, args.num_prompts, 32, 256, seed=0)
    online_prompts = [tokenizer.decode(p) for p in make_prompts(tokenizer, args.num_prompts, 128, 128, seed=1)]
    prompts_file = WORK / "lora_offline_prompts.json"
    prompts_file.write_text(json.dumps(offline_ids))
    for scenario in args.scenarios.split(","):
        per_prompt, n = assign(scenario, args.num_prompts, seed=7)
        names = sorted({a for a in per_prompt if a})
        adapters_file = WORK / f"lora_assign_{scenario}.json"
        adapters_file.write_text(json.dumps(per_prompt))
        entry = results["scenarios"][scenario] = {"num_adapters": n, "adapters_used": len(names)}
        for backend in backends:
            side = entry.setdefault(backend, {})
            if args.only != "online":
                extra = ("--lora-root", str(root), "--adapters", str(adapters_file), "--max-loras", str(max(n, 1)))
                side["offline"] = offline(backend, model_dir, prompts_file, args.output_len, args.quiet_wait,
                                          extra, tag=f"-lora-{scenario}")
            if args.only != "offline":
                models = [a or name for a in per_prompt]
                side["online"] = online(backend, model_dir, name, online_prompts, [args.rate], args.output_len,
                                        args.port, args.quiet_wait, lora_server_args(backend, root, names, n),
                                        models, tag=f"-lora-{scenario}")
        print(f"[{scenario}] {json.dumps(summary_row(scenario, entry, args.rate))}", flush=True)

    results["wall_s"] = (dt.datetime.now() - started).total_seconds()
    out = BENCH / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (started.strftime("%Y-%m-%d-%H%M%S") + "-lora")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results, args.rate)
    stem.with_suffix(".md").write_text(md)
    print("\n" + md + f"\nwrote {stem}.json and {stem}.md")


def summary_row(scenario: str, entry: dict, rate: float) -> dict:
    row = {}
    for backend in ("coserve", "vllm"):
        side = entry.get(backend, {})
        row[f"{backend}_offline_tok_s"] = side.get("offline", {}).get("output_tokens_per_s")
        at_rate = side.get("online", {}).get("rates", {}).get(str(rate), {})
        row[f"{backend}_online_tok_s"] = at_rate.get("output_tokens_per_s")
        row[f"{backend}_tpot_p99_ms"] = at_rate.get("tpot_ms_p99")
        row[f"{backend}_ttft_p99_ms"] = at_rate.get("ttft_ms_p99")
    return row


def markdown(results: dict, rate: float) -> str:
    m = results["machine"]
    lines = [
        f"# Multi-LoRA throughput, {results['date']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM. torch {m['torch']}, "
        f"vLLM {m['vllm']}, coserve {m['coserve_commit']}. Model {results['model']}; {NUM_ADAPTERS} random "
        f"rank-{RANK} adapters on all projections; max_loras = number of adapters. coserve dtype auto, "
        f"vLLM {results['vllm_dtype']} (the type coserve's GEMM probe chose on this CPU).",
        "",
        f"Command: `{results['command']}`",
        "",
        f"| scenario | coserve offline tok/s | vs base | vLLM offline tok/s | vs base "
        f"| coserve online tok/s @{rate} | TPOT p99 ms | vLLM online tok/s | TPOT p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = {s: summary_row(s, e, rate) for s, e in results["scenarios"].items()}
    base = rows.get("base", {})

    def fmt(v, digits=1):
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"

    def ratio(v, b):
        return f"{v / b:.2f}" if isinstance(v, (int, float)) and isinstance(b, (int, float)) and b else "-"

    for scenario, row in rows.items():
        c, v = row["coserve_offline_tok_s"], row["vllm_offline_tok_s"]
        lines.append(
            f"| {scenario} | {fmt(c)} | {ratio(c, base.get('coserve_offline_tok_s'))} | {fmt(v)} "
            f"| {ratio(v, base.get('vllm_offline_tok_s'))} | {fmt(row['coserve_online_tok_s'])} "
            f"| {fmt(row['coserve_tpot_p99_ms'])} | {fmt(row['vllm_online_tok_s'])} | {fmt(row['vllm_tpot_p99_ms'])} |"
        )
    errors = [
        f"- {s} {b} {kind}: `{e[b][kind]['error'].splitlines()[0]}`"
        for s, e in results["scenarios"].items() for b in ("coserve", "vllm") for kind in ("offline", "online")
        if "error" in e.get(b, {}).get(kind, {})
    ]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


if __name__ == "__main__":
    main()
