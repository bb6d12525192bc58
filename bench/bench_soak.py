"""Soak: coserve at about twice the request rate it sustains, for minutes, with several
owners, streaming clients that hang up midway and a finetuning job training; then a
check that nothing leaked.

One command, from the repository root:

    .venv/bin/python bench/bench_soak.py        (--duration 300 --overload 2.0)

1. Starts `coserve serve` in its own process group on the default model with a keys
   file of three owners (team-a, team-b, team-c) and a short waiting queue
   (--max-queued-requests 32), so that overload shows up as 429s.
2. Calibrates: a closed loop of 64 concurrent requests for --calibrate-s seconds; the
   completed requests per second are the sustainable rate.
3. team-a uploads a training file and starts a fine-tuning job long enough to outlast
   the soak; its checkpoints are served as they appear, and a third of team-a's
   requests then use the newest one (so LoRA slots churn too).
4. Soak: Poisson arrivals at --overload x the sustainable rate for --duration seconds,
   each from a random owner, /v1/completions or /v1/chat/completions, half streamed;
   30% of the streams hang up after 3 chunks. Every 5 s: /health (its latency), the
   engine gauges, and the resident memory of the server's process tree.
5. Stops sending, lets what is in flight finish, cancels the job, and reads the gauges:
   running and waiting requests, KV-cache blocks in use, LoRA requests running or
   waiting must all be 0. Memory: after warm-up (the first 60 s) against the end.

`--no-finetune` leaves the job out (memory studies). Prints and writes
bench/results/<date>-<time>-soak.json and .md: requests sent,
completed, 429s, hang-ups, errors (anything else, with its status and message),
/health worst latency, memory, leaks, the job's state. The run stops by itself:
calibration + duration + at most 3 minutes of draining.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_load import running_server, tree_rss_mib, write_run  # noqa: E402
from bench.bench_serving import WORK, result_header, server_cmd, wait_healthy  # noqa: E402
from bench.cpu_monitor import ForeignCpu  # noqa: E402

OWNERS = {"team-a": "sk-soak-team-a-0123456789", "team-b": "sk-soak-team-b-0123456789",
          "team-c": "sk-soak-team-c-0123456789"}
WORDS = ("river stone market light winter garden signal paper orbit thunder violet anchor "
         "harbor copper meadow engine lantern summit canvas falcon").split()
SAMPLE_EVERY_S = 5.0
WARMUP_S = 60.0
DRAIN_LIMIT_S = 180.0
HANG_UP_AFTER_CHUNKS = 3
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
          "num_requests_waiting_for_lora_slot", "lora_requests_running", "lora_requests_waiting")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of overload")
    p.add_argument("--overload", type=float, default=2.0, help="arrival rate / sustainable rate")
    p.add_argument("--calibrate-s", type=float, default=40.0)
    p.add_argument("--port", type=int, default=8335)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-finetune", action="store_true", help="soak without the fine-tuning job (memory studies)")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    return p.parse_args()


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))


class Soak:
    def __init__(self, base_url: str, model: str, rng: random.Random):
        self.base_url = base_url
        self.model = model
        self.rng = rng
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.adapter: str | None = None  # team-a's newest checkpoint, once served

    def _request(self, owner: str) -> tuple[str, dict, bool]:
        rng = self.rng
        model = self.model
        if owner == "team-a" and self.adapter and rng.random() < 1 / 3:
            model = self.adapter
        stream = rng.random() < 0.5
        body = {"model": model, "max_tokens": rng.randint(16, 96), "temperature": 1.0, "stream": stream}
        if rng.random() < 0.5:
            return "/v1/completions", {**body, "prompt": _prompt(rng)}, stream
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": _prompt(rng)}]}, stream

    async def one(self, http: httpx.AsyncClient, owner: str, hang_up: bool = False) -> None:
        path, body, stream = self._request(owner)
        headers = {"Authorization": f"Bearer {OWNERS[owner]}"}
        try:
            if not stream:
                response = await http.post(path, json=body, headers=headers)
                self._count(response.status_code, response.text)
                return
            async with http.stream("POST", path, json=body, headers=headers) as response:
                if response.status_code != 200:
                    self._count(response.status_code, (await response.aread()).decode(errors="replace"))
                    return
                chunks = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: {\"error\""):  # failed after the headers went out
                        self.outcomes["error"] += 1
                        self.errors[f"error event {line[6:166]}"] += 1
                        return
                    chunks += line.startswith("data: ")
                    if hang_up and chunks == HANG_UP_AFTER_CHUNKS:
                        self.outcomes["hung up"] += 1
                        return
                self.outcomes["completed"] += 1
        except httpx.HTTPError as exc:
            self._count(0, f"{type(exc).__name__}: {exc}")

    def _count(self, status: int, text: str) -> None:
        if status == 200:
            self.outcomes["completed"] += 1
        elif status == 429:
            self.outcomes["429"] += 1
        else:
            self.outcomes["error"] += 1
            self.errors[f"{status} {text[:160]}"] += 1


async def calibrate(soak: Soak, http: httpx.AsyncClient, seconds: float, concurrency: int = 64) -> float:
    """Completed requests per second of a closed loop of `concurrency` clients."""
    deadline = time.monotonic() + seconds
    before = soak.outcomes["completed"]

    async def client(i: int) -> None:
        while time.monotonic() < deadline:
            await soak.one(http, list(OWNERS)[i % len(OWNERS)])

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    rate = (soak.outcomes["completed"] - before) / (time.monotonic() - started)
    soak.outcomes.clear()
    soak.errors.clear()
    return rate


async def gauges(http: httpx.AsyncClient) -> dict[str, float]:
    """Each gauge of GAUGES summed over its label sets."""
    text = (await http.get("/metrics")).text
    values = dict.fromkeys(GAUGES, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("coserve:")
        if name in values and not line.startswith("#"):
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


async def sample(http: httpx.AsyncClient, server_pid: int, samples: list, started: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        health = await http.get("/health")
        health_s = time.monotonic() - t0
        samples.append({"t": round(t0 - started, 1), "health_s": round(health_s, 3), "health": health.status_code,
                        "rss_mib": round(tree_rss_mib(server_pid), 1), **await gauges(http)})
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)
        except TimeoutError:
            pass


async def start_job(http: httpx.AsyncClient, model: str) -> str:
    headers = {"Authorization": f"Bearer {OWNERS['team-a']}"}
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Say the code {i}."},
                                      {"role": "assistant", "content": f"The code is {i * 7919 % 1000}."}]})
             for i in range(64)]
    upload = await http.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                             files={"file": ("soak.jsonl", "\n".join(lines).encode())})
    upload.raise_for_status()
    job = await http.post("/v1/fine_tuning/jobs", headers=headers, json={
        "model": model, "training_file": upload.json()["id"], "hyperparameters": {"n_epochs": 50, "batch_size": 4}})
    job.raise_for_status()
    return job.json()["id"]


async def stop_job(http: httpx.AsyncClient, job_id: str) -> tuple[dict, int]:
    """The job as the soak left it and its optimizer steps; cancelled if still going."""
    headers = {"Authorization": f"Bearer {OWNERS['team-a']}"}
    job = (await http.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json()
    events = (await http.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=10000", headers=headers)).json()["data"]
    if job["status"] in ("running", "paused", "queued", "validating_files"):
        await http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers)
    return job, len([e for e in events if e.get("data")])


async def follow_checkpoints(http: httpx.AsyncClient, soak: Soak, job_id: str, stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {OWNERS['team-a']}"}
    while not stop.is_set():
        page = (await http.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=headers)).json()
        if page.get("data"):
            soak.adapter = page["data"][0]["fine_tuned_model_checkpoint"]
        try:
            await asyncio.wait_for(stop.wait(), 10)
        except TimeoutError:
            pass


async def run(args: argparse.Namespace, base_url: str, model: str, server_pid: int) -> dict:
    rng = random.Random(args.seed)
    soak = Soak(base_url, model, rng)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        sustainable = await calibrate(soak, http, args.calibrate_s)
        rate = args.overload * sustainable
        print(f"[soak] sustainable {sustainable:.2f} req/s; soaking at {rate:.2f} req/s for {args.duration:.0f} s",
              flush=True)
        job_id = None if args.no_finetune else await start_job(http, model)
        stop = asyncio.Event()
        samples: list[dict] = []
        started = time.monotonic()
        watchers = [asyncio.create_task(sample(http, server_pid, samples, started, stop)),
                    *([asyncio.create_task(follow_checkpoints(http, soak, job_id, stop))] if job_id else [])]
        in_flight: set[asyncio.Task] = set()
        sent = Counter()
        with ForeignCpu() as foreign:
            while time.monotonic() - started < args.duration:
                await asyncio.sleep(rng.expovariate(rate))
                owner = rng.choice(list(OWNERS))
                task = asyncio.create_task(soak.one(http, owner, hang_up=rng.random() < 0.15))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent[owner] += 1
            drain_started = time.monotonic()
            if in_flight:
                await asyncio.wait(in_flight, timeout=DRAIN_LIMIT_S)
            drain_s = time.monotonic() - drain_started
        stuck = len(in_flight)
        for task in in_flight:
            task.cancel()
        job, steps_during_soak = ({"status": "none (--no-finetune)"}, 0) if job_id is None else \
            await stop_job(http, job_id)
        await asyncio.sleep(SAMPLE_EVERY_S)  # the engine lets the cancelled job's sequence go
        stop.set()
        await asyncio.gather(*watchers)
        final = await gauges(http)
        rss_end = tree_rss_mib(server_pid)
    warm = [s for s in samples if s["t"] >= WARMUP_S]
    return {
        "sustainable_req_s": round(sustainable, 3),
        "rate_req_s": round(rate, 3),
        "duration_s": args.duration,
        "sent": sum(sent.values()),
        "sent_by_owner": dict(sent),
        "outcomes": dict(soak.outcomes),
        "errors": dict(soak.errors),
        "stuck_requests": stuck,
        "drain_s": round(drain_s, 1),
        "health_worst_s": max(s["health_s"] for s in samples),
        "health_not_200": sum(s["health"] != 200 for s in samples),
        "rss_start_mib": samples[0]["rss_mib"],
        "rss_after_warmup_mib": warm[0]["rss_mib"] if warm else None,
        "rss_peak_mib": max(s["rss_mib"] for s in samples),
        "rss_end_mib": round(rss_end, 1),
        "final_gauges": final,
        "job": {"id": job_id, "status_at_end": job["status"], "steps": steps_during_soak,
                "error": job.get("error")},
        "foreign_cpu_share": round(foreign.share, 3),
        "samples": samples,
    }


def report(results: dict) -> str:
    r, m = results["soak"], results["machine"]
    leaks = {name: value for name, value in r["final_gauges"].items() if value}
    growth = (r["rss_end_mib"] - r["rss_after_warmup_mib"]) if r["rss_after_warmup_mib"] else None
    # Flat or still growing: the memory of the later half, where warm-up is long past.
    late = [s["rss_mib"] for s in r["samples"] if r["duration_s"] / 2 <= s["t"] <= r["duration_s"]]
    second_half = (f"{late[0]:.0f} / {min(late):.0f} / {max(late):.0f} / {late[-1]:.0f} MiB "
                   f"({late[-1] - late[0]:+.0f} MiB)" if late else "n/a")
    lines = [
        f"# Soak, {results['date']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB; coserve commit {m['coserve_commit']}; "
        f"command `{results['command']}`; other processes' CPU share during the soak {r['foreign_cpu_share']:.1%}.",
        "",
        "| | |",
        "|---|---|",
        f"| sustainable rate (closed loop, 64 clients) | {r['sustainable_req_s']:.2f} req/s |",
        f"| soak rate, duration | {r['rate_req_s']:.2f} req/s, {r['duration_s']:.0f} s |",
        f"| requests sent (per owner) | {r['sent']} ({', '.join(f'{k} {v}' for k, v in r['sent_by_owner'].items())}) |",
        f"| completed / 429 / hung up on purpose | {r['outcomes'].get('completed', 0)} / {r['outcomes'].get('429', 0)}"
        f" / {r['outcomes'].get('hung up', 0)} |",
        f"| errors (not 429) | {r['outcomes'].get('error', 0)} |",
        f"| requests still open after {DRAIN_LIMIT_S:.0f} s of draining | {r['stuck_requests']} "
        f"(drained in {r['drain_s']:.0f} s) |",
        f"| /health worst latency, non-200 answers | {r['health_worst_s'] * 1000:.0f} ms, {r['health_not_200']} |",
        f"| RSS of the server tree: start / after {WARMUP_S:.0f} s / peak / end | {r['rss_start_mib']:.0f} / "
        f"{r['rss_after_warmup_mib'] or 0:.0f} / {r['rss_peak_mib']:.0f} / {r['rss_end_mib']:.0f} MiB"
        + (f" (end - warm: {growth:+.0f} MiB)" if growth is not None else "") + " |",
        f"| RSS over the second half of the soak: first / min / max / last | {second_half} |",
        f"| gauges at the end (running, waiting, KV in use, LoRA) | "
        f"{'all 0' if not leaks else 'LEAK: ' + json.dumps(leaks)} |",
        f"| finetuning job | {r['job']['status_at_end']} at the end, {r['job']['steps']} steps |",
    ]
    if r["errors"]:
        lines += ["", "Errors:", *(f"- {count} x {text}" for text, count in r["errors"].items())]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, WORK)
    work = WORK / "soak"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"key": key, "owner": owner} for owner, key in OWNERS.items()]}))
    run_started = dt.datetime.now()
    results = result_header(run_started, name)
    started = time.monotonic()
    cmd = server_cmd("coserve", model_dir, name, args.port, ("--api-keys-file", str(keys), "--data-dir",
                                                             str(work / "data"), "--max-queued-requests", "32"))
    base_url = f"http://127.0.0.1:{args.port}"
    with running_server("coserve", cmd, args.port, work / "server.log") as proc:
        wait_healthy(base_url, proc)
        results["soak"] = asyncio.run(run(args, base_url, name, proc.pid))
    results["wall_s"] = time.monotonic() - started
    write_run(results, report(results), args.out_dir, run_started, "soak")


if __name__ == "__main__":
    main()
