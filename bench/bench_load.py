"""Load test: coserve against vLLM's CPU build, both driven by vLLM's own load generator.

One command, from the repository root (vLLM's venv first: `bash bench/setup_vllm.sh`):

    .venv/bin/python bench/bench_load.py        (or `make bench-load`)

Both servers run side by side (--port and the port after it), serving the same
converted default model under the same name. Level by level, each in turn gets
`vllm bench serve` (vLLM's benchmark client, run from bench/.vllm-venv) while the
other idles, the order flipping from level to level (this host's speed drifts by 20%
or more within an hour: a level's two runs are minutes apart, not half an hour).
The client sends streaming /v1/completions of 128 random prompt tokens x 128 output
tokens, ignore_eos, temperature 1 (--temperature), a fixed seed per level (the same
prompts for both servers):
  * a concurrency sweep: --max-concurrency 1, 8, 32, 64, 128, every request sent at
    once (--request-rate inf), max(16, 2 x concurrency) requests per level;
  * a request-rate sweep: Poisson arrivals at 1, 2, 4 req/s and all at once (inf),
    64 requests per level, no concurrency cap;
  * memory: resident set size (RSS) summed over the server's process tree (/proc),
    right after start-up and its peak during the highest concurrency level (128).
    Summed RSS counts a library mapped by several processes once per process; both
    servers run a front end and an engine process.
Per level: request and output-token throughput, TTFT and TPOT p50/p99, ITL p99,
completed and failed requests, and the share of the CPU other processes took
("foreign CPU %"; each level first waits up to --quiet-wait s for the machine to go
quiet) and the share the idle server took: read numbers with a high share as skewed.
The client runs on the same cores as the server, the same for both. Writes
bench/results/<date>-<time>-load.json and .md (machine, versions, command, env). About
32-34 minutes on 2 cores (2026-12-07).

Options: --concurrency 1,8,32,64,128, --prompts-per-level 2 and --min-prompts 16
(requests per concurrency level), --rates 1,2,4,inf, --rate-prompts 64,
--input-len/--output-len 128, --temperature 1.0, --order coserve,vllm (which starts
first and runs first at the first level), --skip-coserve, --skip-vllm, --port 8321,
--quiet-wait 20, --out-dir, --coserve-arg ARG (repeatable: extra `coserve serve`
arguments), --vllm-arg ARG (the same for `vllm serve`; its --dtype defaults to the
type coserve's GEMM probe chose on this CPU, bench_serving.peer_dtype), --vllm-own-binding.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_serving import (  # noqa: E402
    BACKENDS, BENCH, VLLM_ENV, VLLM_VENV, WORK, _tail, backend_env, bind_vllm_threads_to_all_cores,
    result_header, server_cmd, stop, wait_healthy,
)
from bench.cpu_monitor import HZ, NCPU, ForeignCpu, process_stats, wait_for_quiet  # noqa: E402
from bench.loadgen import warmup  # noqa: E402

VLLM_CLI = VLLM_VENV / "bin/vllm"
RAW = WORK / "load-raw"  # vllm bench serve's own result files, one per level (overwritten per run)
SEED = 0
LEVEL_TIMEOUT_S = 1800
RSS_SAMPLE_S = 1.0
WARMUP_PROMPT = "The capital of France is"
LABELS = {"coserve": "coserve", "vllm": "vLLM-CPU"}


# ---------------------------------------------------------------- processes and memory


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers bind: SO_REUSEADDR, so the previous server's TIME_WAIT connections don't count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _processes() -> dict[int, tuple[int, int, int, int]]:
    """pid -> (ppid, process group, resident pages, CPU ticks (user + system)), from
    /proc/<pid>/stat; zombies left out (they hold no memory, and an unreaped one would
    look like a server still running)."""
    return {
        pid: (int(rest[1]), int(rest[2]), int(rest[21]), int(rest[11]) + int(rest[12]))
        for pid, rest in process_stats().items() if rest[0] != "Z"
    }


def server_tree(root: int, procs: dict[int, tuple[int, int, int, int]]) -> set[int]:
    """The server's process group (start_new_session made `root` its leader) plus any
    descendant that moved to a group of its own."""
    tree = {pid for pid, (_, pgrp, *_) in procs.items() if pgrp == root}
    frontier = [root, *tree]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, *_) in procs.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return tree


def tree_rss_mib(root: int) -> float:
    procs = _processes()
    return sum(procs[pid][2] for pid in server_tree(root, procs)) * os.sysconf("SC_PAGE_SIZE") / 2**20


class TreeCpu:
    """`with TreeCpu([root, ...]) as tc: ...` then `tc.share`: the busy cores of these servers'
    process trees / all cores."""

    def __init__(self, roots: list[int]):
        self._roots = roots

    def _ticks(self) -> int:
        procs = _processes()
        return sum(procs[pid][3] for root in self._roots for pid in server_tree(root, procs))

    def __enter__(self) -> "TreeCpu":
        self._t0 = time.monotonic()
        self._ticks0 = self._ticks()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._t0
        # max(0, ...): a process that exited during the run takes its ticks with it.
        self.share = max(0, self._ticks() - self._ticks0) / HZ / (wall * NCPU)


class PeakRss:
    """`with PeakRss(pid) as m: ...` then `m.peak_mib`: the largest tree RSS, sampled every second
    from a thread (reading /proc stat files is cheap next to the server's work)."""

    def __init__(self, root: int):
        self._root = root

    def __enter__(self) -> "PeakRss":
        self.peak_mib = tree_rss_mib(self._root)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(RSS_SAMPLE_S):
            self.peak_mib = max(self.peak_mib, tree_rss_mib(self._root))

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """stop() the group, then wait for all of it: the leader can exit while vLLM's engine
    core is still shutting down, and a straggler would load the next server's CPU."""
    stop(proc)
    deadline = time.monotonic() + grace
    while server_tree(proc.pid, _processes()):
        if time.monotonic() > deadline:
            print(f"[load] server group {proc.pid} outlived SIGTERM; killing it", flush=True)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # gone in the meantime
            break
        time.sleep(0.5)


@contextmanager
def running_server(backend: str, cmd: list[str], port: int, log: Path):
    """Starts the server in its own process group and stops the whole group afterwards."""
    if not port_free(port):
        raise RuntimeError(f"port {port} is in use on 127.0.0.1: stop what listens there or pass --port")
    print(f"[load] {backend}: {shlex.join(cmd)}  (log: {log})", flush=True)
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=backend_env(backend), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_group(proc)


# ---------------------------------------------------------------- load levels


def bench_cmd(name: str, model_dir: Path, port: int, num_prompts: int, rate: str, concurrency: int | None,
              input_len: int, output_len: int, seed: int, temperature: float, result_file: Path) -> list[str]:
    cmd = [str(VLLM_CLI), "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
           "--host", "127.0.0.1", "--port", str(port), "--model", name, "--tokenizer", str(model_dir),
           "--dataset-name", "random", "--random-input-len", str(input_len),
           "--random-output-len", str(output_len), "--ignore-eos", "--num-prompts", str(num_prompts),
           "--request-rate", rate, "--seed", str(seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           # Set explicitly, so neither server falls back to defaults of its own (vLLM reads
           # the model's generation_config.json). Default 1.0: what an OpenAI client gets
           # when it sets nothing, and the costlier case for a sampler.
           "--extra-body", json.dumps({"temperature": temperature}),
           # --save-detailed: per-request errors, so a failed request's cause reaches the results.
           "--disable-tqdm", "--save-result", "--save-detailed",
           "--result-dir", str(result_file.parent), "--result-filename", result_file.name]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    return cmd


def summarize(raw: dict) -> dict:
    """vLLM's result without its per-request lists, plus a few distinct request errors."""
    errors = sorted({e.strip()[-300:] for e in raw.get("errors", []) if e})
    return {**{k: v for k, v in raw.items() if not isinstance(v, list)},
            **({"error_samples": errors[:3]} if errors else {})}


def run_bench(cmd: list[str], result_file: Path, log: Path) -> dict:
    """Runs `vllm bench serve` (`cmd` from bench_cmd) and returns its whole result, per-request
    lists included, or {"error": ...} where it failed or wrote none."""
    result_file.unlink(missing_ok=True)  # never read a previous run's numbers
    try:
        with open(log, "w") as logf:
            done = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, timeout=LEVEL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"vllm bench serve ran past {LEVEL_TIMEOUT_S} s\n{_tail(log)}"}
    if done.returncode != 0 or not result_file.exists():
        return {"error": f"vllm bench serve exit {done.returncode}\n{_tail(log)}"}
    return json.loads(result_file.read_text())


def run_level(label: str, proc: subprocess.Popen, cmd: list[str], result_file: Path, log: Path,
              quiet_wait: float, idle_peers: list[int] | None = None) -> dict:
    """One `vllm bench serve` run; a failure is recorded for this level and the sweep goes on.
    idle_peers: the other servers' process group leaders, whose CPU during the run is recorded."""
    if proc.poll() is not None:  # ends this server's sweeps: nothing left to measure
        raise RuntimeError(f"server exited with code {proc.returncode}")
    print(f"[load] {label}: {shlex.join(cmd)}  (log: {log})", flush=True)
    wait_for_quiet(quiet_wait)
    with ForeignCpu() as foreign, PeakRss(proc.pid) as rss, TreeCpu(idle_peers or []) as peers:
        raw = run_bench(cmd, result_file, log)
    if "error" in raw:
        return raw
    level = {**summarize(raw), "foreign_cpu_share": foreign.share, "idle_peer_cpu_share": peers.share,
             "peak_rss_mib": rss.peak_mib, "bench_command": shlex.join(cmd)}
    print(f"[load] {label}: {level['output_throughput']:.1f} output tok/s, p99 TPOT {level['p99_tpot_ms']:.1f} ms, "
          f"{level['completed']} completed, {level['failed']} failed, foreign CPU {foreign.share:.0%}, "
          f"idle peer CPU {peers.share:.1%}", flush=True)
    return level


def _levels_to_run(args: argparse.Namespace) -> list[tuple[str, str, str, int | None, int]]:
    """(sweep, level key, request rate, max concurrency or None, requests) in the order they run."""
    levels = [("concurrency", str(c), "inf", c, max(args.min_prompts, args.prompts_per_level * c))
              for c in args.concurrency]
    return levels + [("rate", r, r, None, args.rate_prompts) for r in args.rates]


def start_server(stack: ExitStack, backend: str, model_dir: Path, name: str, port: int,
                 args: argparse.Namespace) -> tuple[dict, subprocess.Popen | None]:
    """Starts one server (stopped when `stack` closes), waits for it, measures its start-up
    and idle memory and warms it up. Returns its result dict and process, or (result with
    "error", None): a server that fails is a result to report, not a reason to lose the other's."""
    extra = tuple(args.coserve_arg if backend == "coserve" else args.vllm_arg)
    cmd = server_cmd(backend, model_dir, name, port, extra)
    env = dict(VLLM_ENV) if backend == "vllm" else {k: v for k, v in os.environ.items() if k.startswith("COSERVE_")}
    result: dict = {"command": shlex.join(cmd), "env": env, "concurrency": {}, "rate": {}}
    log = WORK / "logs" / f"load-server-{backend}.log"
    log.unlink(missing_ok=True)  # an error before start-up must not quote the previous run's log
    proc = None
    try:
        proc = stack.enter_context(running_server(backend, cmd, port, log))
        base_url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        wait_healthy(base_url, proc)
        result["startup_s"] = time.monotonic() - started
        # Idle: up and healthy, nothing served yet (the warm-up already grows pools and caches).
        result["idle_rss_mib"] = tree_rss_mib(proc.pid)
        # Short: it only has to trigger one-time costs (first-call compilation, allocations).
        asyncio.run(warmup(base_url, name, WARMUP_PROMPT, output_len=16))
        return result, proc
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}" + (f"\n{_tail(log)}" if log.exists() else "")
        if proc is not None:
            stop_group(proc)  # now, so a broken server does not load the CPU under the other's levels
        return result, None


def bench_servers(backends: list[str], model_dir: Path, name: str, args: argparse.Namespace) -> dict[str, dict]:
    """Both sweeps against every server, level by level: all servers run side by side (one
    port each), and each level runs on one server after the other, the order flipping
    from level to level. This host's speed drifts by 20% or more within an hour, so a
    level's numbers compare only with what ran minutes apart. The server not being
    measured is idle; the CPU its process tree took anyway is recorded per level."""
    results: dict[str, dict] = {}
    with ExitStack() as stack:
        procs: dict[str, subprocess.Popen] = {}
        ports: dict[str, int] = {}
        for i, backend in enumerate(backends):  # one at a time: start-up is measured alone
            ports[backend] = args.port + i
            results[backend], proc = start_server(stack, backend, model_dir, name, ports[backend], args)
            if proc is not None:
                procs[backend] = proc
        for i, (sweep, key, rate, concurrency, n) in enumerate(_levels_to_run(args)):
            order = [b for b in (backends if i % 2 == 0 else backends[::-1]) if b in procs]
            for backend in order:
                tag = f"{backend}-{sweep}-{key}"
                # A seed per level: the same prompts for both servers, new ones at each level, so
                # no level finds the previous one's prompts in a prefix cache (vLLM's is on).
                cmd = bench_cmd(name, model_dir, ports[backend], n, rate, concurrency, args.input_len,
                                args.output_len, SEED + i, args.temperature, RAW / f"{tag}.json")
                peers = [p.pid for b, p in procs.items() if b != backend]
                try:
                    level = run_level(f"{backend} {sweep} {key}", procs[backend], cmd, RAW / f"{tag}.json",
                                      WORK / "logs" / f"load-{tag}.log", args.quiet_wait, peers)
                except RuntimeError as e:  # the server exited: nothing left to measure on it
                    results[backend]["error"] = f"{e}\n{_tail(WORK / 'logs' / f'load-server-{backend}.log')}"
                    stop_group(procs.pop(backend))
                    continue
                results[backend][sweep][key] = {"num_prompts": n, **level}
    return results


def _num(v, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"


def _ratio(a, b) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _pair(level: dict, metric: str) -> str:
    return f"{_num(level.get(f'p50_{metric}_ms'))} / {_num(level.get(f'p99_{metric}_ms'))}"


def _levels(results: dict, sweep: str) -> list[tuple[str, dict, dict]]:
    """(level, coserve's result, vLLM's result) in the order the sweep ran."""
    servers = results["servers"]
    keys = list(dict.fromkeys(k for s in servers.values() for k in s.get(sweep, {})))
    return [(k, servers.get("coserve", {}).get(sweep, {}).get(k, {}), servers.get("vllm", {}).get(sweep, {}).get(k, {}))
            for k in keys]


def _unit(sweep: str) -> str:
    return "concurrency" if sweep == "concurrency" else "rate (req/s)"


def sweep_table(results: dict, sweep: str) -> str:
    unit = _unit(sweep)
    lines = [f"| {unit} | requests | coserve tok/s | vLLM tok/s | coserve/vLLM | TTFT p50/p99 ms coserve "
             "| TTFT p50/p99 ms vLLM | TPOT p50/p99 ms coserve | TPOT p50/p99 ms vLLM | p99 TPOT coserve/vLLM "
             "| foreign CPU % coserve / vLLM |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, c, v in _levels(results, sweep):
        foreign = " / ".join(_num(s.get("foreign_cpu_share", 0) * 100) if "foreign_cpu_share" in s else "n/a"
                             for s in (c, v))
        lines.append(f"| {key} | {c.get('num_prompts', v.get('num_prompts'))} | {_num(c.get('output_throughput'))} "
                     f"| {_num(v.get('output_throughput'))} "
                     f"| {_num(_ratio(c.get('output_throughput'), v.get('output_throughput')), 2)} "
                     f"| {_pair(c, 'ttft')} | {_pair(v, 'ttft')} | {_pair(c, 'tpot')} | {_pair(v, 'tpot')} "
                     f"| {_num(_ratio(c.get('p99_tpot_ms'), v.get('p99_tpot_ms')), 2)} | {foreign} |")
    return "\n".join(lines)


def detail_table(results: dict, sweep: str) -> str:
    unit = _unit(sweep)
    lines = [f"| {unit} | server | requests/s | output tok/s | ITL p99 ms | E2E p99 ms | completed | failed "
             "| peak RSS MiB | idle server's CPU % |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, c, v in _levels(results, sweep):
        for backend, s in (("coserve", c), ("vllm", v)):
            if backend in results["servers"]:
                lines.append(f"| {key} | {LABELS[backend]} | {_num(s.get('request_throughput'), 2)} "
                             f"| {_num(s.get('output_throughput'))} | {_num(s.get('p99_itl_ms'))} "
                             f"| {_num(s.get('p99_e2el_ms'), 0)} | {s.get('completed', 'n/a')} "
                             f"| {s.get('failed', 'n/a')} | {_num(s.get('peak_rss_mib'), 0)} "
                             f"| {_num(s['idle_peer_cpu_share'] * 100) if 'idle_peer_cpu_share' in s else 'n/a'} |")
    return "\n".join(lines)


def verdicts(results: dict, sweep: str) -> list[str]:
    """Facts, not a pass/fail: coserve's throughput >= vLLM's, coserve's p99 TPOT <= vLLM's."""
    unit = _unit(sweep)
    out = []
    for key, c, v in _levels(results, sweep):
        tput = _ratio(c.get("output_throughput"), v.get("output_throughput"))
        tpot = _ratio(c.get("p99_tpot_ms"), v.get("p99_tpot_ms"))
        fact = lambda r, ok: "n/a" if r is None else f"{'yes' if ok(r) else 'no'} ({r:.2f}x)"  # noqa: E731
        out.append(f"{unit} {key}: coserve throughput >= vLLM: {fact(tput, lambda r: r >= 1)}; "
                   f"coserve p99 TPOT <= vLLM: {fact(tpot, lambda r: r <= 1)}")
    return out


def memory_table(results: dict) -> str:
    servers = results["servers"]
    top = max(results["settings"]["concurrency"], default=None)
    get = lambda b, *path: _dig(servers.get(b, {}), *path)  # noqa: E731
    rows = [("idle RSS MiB (after start-up)", ("idle_rss_mib",)),
            (f"peak RSS MiB (concurrency {top})", ("concurrency", str(top), "peak_rss_mib"))]
    lines = ["| server process tree | coserve | vLLM-CPU | coserve/vLLM |", "|---|---:|---:|---:|"]
    for label, path in rows:
        a, b = get("coserve", *path), get("vllm", *path)
        lines.append(f"| {label} | {_num(a, 0)} | {_num(b, 0)} | {_num(_ratio(a, b), 2)} |")
    return "\n".join(lines)


def _dig(d: dict, *path):
    for key in path:
        d = d.get(key, {}) if isinstance(d, dict) else {}
    return d if isinstance(d, (int, float)) else None


def errors(results: dict) -> list[str]:
    out = []
    for backend, s in results["servers"].items():
        if "error" in s:
            out.append(f"- {LABELS[backend]}: `{s['error'].splitlines()[0]}`")
        for sweep in ("concurrency", "rate"):
            for key, level in s.get(sweep, {}).items():
                if "error" in level:
                    out.append(f"- {LABELS[backend]} {sweep} {key}: `{level['error'].splitlines()[0]}`")
                for e in level.get("error_samples", []):
                    out.append(f"- {LABELS[backend]} {sweep} {key}, a failed request: `{e.splitlines()[-1]}`")
    return out


def header(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    servers = "".join(f"{LABELS[b]}: `{r['command']}`, env {r['env']}\n\n" for b, r in results["servers"].items())
    return (f"# coserve vs vLLM-CPU under load (`vllm bench serve`), {results['date']}\n\n"
            f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM. coserve commit "
            f"{m['coserve_commit']}, torch {m['torch']}; vLLM {m['vllm']} (torch {m['vllm_torch']}).\n\n"
            f"Model {results['model']} ({results['model_dir']}), served by both under that name. Requests: "
            f"{s['input_len']} random prompt tokens x {s['output_len']} output tokens, ignore_eos, temperature {s['temperature']}, "
            f"seed {SEED} + level index, streaming /v1/completions; the client runs on the same cores.\n\n"
            f"KV cache: {results['kv_cache']}.\n\n{servers}"
            f"Command: `{results['command']}`\n")


def report(results: dict) -> str:
    parts = [header(results)]
    for sweep, title in (("concurrency", "Concurrency sweep (request rate inf)"),
                         ("rate", "Request-rate sweep (Poisson, no concurrency cap)")):
        if _levels(results, sweep):
            parts += [f"## {title}\n", sweep_table(results, sweep), "", detail_table(results, sweep), "",
                      *verdicts(results, sweep), ""]
    parts += ["## Memory (RSS summed over the server's process tree)\n", memory_table(results)]
    errs = errors(results)
    return "\n".join(parts + (["", "## Errors\n", *errs] if errs else []))


# ---------------------------------------------------------------- main


def kv_cache_note(coserve_args: list[str]) -> str:
    from server.settings import ENV_PREFIX, Settings

    default = Settings.model_fields["kv_cache_memory_gb"].default
    changed = any(a.startswith("--kv-cache-memory-gb") for a in coserve_args) or \
        f"{ENV_PREFIX}KV_CACHE_MEMORY_GB" in os.environ
    return (f"vLLM VLLM_CPU_KVCACHE_SPACE={VLLM_ENV['VLLM_CPU_KVCACHE_SPACE']} GiB; coserve "
            + ("set by --coserve-arg or the environment (see its command and env)" if changed
               else f"{default} GiB (its --kv-cache-memory-gb default)"))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-coserve", action="store_true")
    ap.add_argument("--order", default=",".join(BACKENDS), help="servers in the order they start and run the first level")
    ap.add_argument("--concurrency", type=ints, default=[1, 8, 32, 64, 128], help="comma-separated levels")
    ap.add_argument("--prompts-per-level", type=int, default=2, help="requests per concurrency level = this x level")
    ap.add_argument("--min-prompts", type=int, default=16, help="... but at least this many")
    ap.add_argument("--rates", type=lambda s: s.split(","), default=["1", "2", "4", "inf"],
                    help="comma-separated request rates (req/s, Poisson; inf: all at once)")
    ap.add_argument("--rate-prompts", type=int, default=64, help="requests per rate level")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    ap.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every request")
    ap.add_argument("--port", type=int, default=8321, help="the first server's port; the second takes the next")
    ap.add_argument("--quiet-wait", type=float, default=20,
                    help="seconds to wait, before each level, for other processes to leave the CPU")
    ap.add_argument("--out-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--coserve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument to `coserve serve` (repeatable; e.g. --coserve-arg=--max-num-seqs=128)")
    ap.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                    help="extra argument to `vllm serve` (repeatable), after the defaults it overrides: e.g. "
                         "--vllm-arg=--dtype=bfloat16 (the default is the type coserve measured fastest here)")
    ap.add_argument("--vllm-own-binding", action="store_true",
                    help="let vLLM bind its OpenMP threads itself (it computes on one core and reserves one); "
                         "by default it computes on all cores, like coserve")
    args = ap.parse_args()
    # Fail now on a typo, not after the first server's sweeps.
    for r in args.rates:
        float(r)
    if not set(args.order.split(",")) <= set(BACKENDS):
        ap.error(f"--order takes a comma-separated subset of {','.join(BACKENDS)}")
    return args


def start_run(args: argparse.Namespace, work_dirs: list[Path]) -> tuple[Path, str, dt.datetime]:
    """What a run against vLLM-CPU does first: vLLM's threads over all cores (unless
    --vllm-own-binding), its client checked (`vllm bench serve` drives every server), the
    work directories, and the one converted model directory all servers serve (identical
    weights). Returns (model_dir, served name, start time)."""
    if not args.vllm_own_binding:
        bind_vllm_threads_to_all_cores()
    if not VLLM_CLI.exists():
        sys.exit("vLLM is not installed: run `bash bench/setup_vllm.sh` first")
    for directory in work_dirs:
        directory.mkdir(parents=True, exist_ok=True)

    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, WORK)
    return model_dir, name, dt.datetime.now()


def write_run(results: dict, md: str, out_dir: Path, started: dt.datetime, kind: str) -> None:
    """bench/results/<date>-<time>-<kind>.json and .md, and the report on stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / started.strftime(f"%Y-%m-%d-%H%M%S-{kind}")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md + "\n")
    print("\n" + md + f"\n\nwrote {stem}.json and {stem}.md (wall {results['wall_s']:.0f} s)")


def main() -> None:
    args = parse_args()
    backends = [b for b in args.order.split(",") if b in BACKENDS and not getattr(args, f"skip_{b}")]
    model_dir, name, started = start_run(args, [WORK / "logs", RAW])
    results: dict = {
        **result_header(started, name),
        "model_dir": str(model_dir),
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "kv_cache": kv_cache_note(args.coserve_arg),
        "vllm_env": dict(VLLM_ENV),
        "servers": {},
    }
    results["servers"] = bench_servers(backends, model_dir, name, args)
    results["verdicts"] = {sweep: verdicts(results, sweep) for sweep in ("concurrency", "rate")}
    results["wall_s"] = (dt.datetime.now() - started).total_seconds()
    write_run(results, report(results), args.out_dir, started, "load")


if __name__ == "__main__":
    main()
