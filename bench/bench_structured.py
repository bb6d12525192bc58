"""Output throughput with and without `json_schema`, 32 requests in flight, one run.

One command, from the repository root:

    .venv/bin/python bench/bench_structured.py

Starts coserve on the default model (its own process group, the port checked free,
stopped afterwards) and runs two phases against it, each first waiting for the machine
to go quiet:
  * constrained: chat completions with `response_format` json_schema, cycling through the
    schemas of bench/grammar_schemas.py (nested objects, arrays, enums, bounded
    numbers), temperature 0.7, a seed per request;
  * unconstrained: the same prompts and seeds without response_format, `ignore_eos`,
    and as max_tokens each request's output length in the constrained phase: both phases
    prefill the same and decode the same number of tokens per request, and their batches
    drain alike at the end (what is left to differ is the cost of guided decoding).
32 closed-loop clients each send requests back to back (--requests in all), so the
batch stays full but for the tail. A warm-up sends every prompt once first (both phases
then find them in the prefix cache) and each schema once (its grammar compiled). Output throughput = completion tokens / wall time.
The constrained outputs are checked: finished by the grammar ("stop"), parsing as JSON.
Records the foreign CPU share of each phase (bench/cpu_monitor.py); rerun when it is
high. Writes bench/results/<date>-<time>-structured.json and .md. Target: constrained
at least 0.8 of unconstrained.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_load import running_server, write_run  # noqa: E402
from bench.bench_prefix import uncommitted_changes  # noqa: E402
from bench.bench_serving import WORK, result_header, server_cmd, wait_healthy  # noqa: E402
from bench.cpu_monitor import ForeignCpu, wait_for_quiet  # noqa: E402
from bench.grammar_schemas import SCHEMAS  # noqa: E402

TARGET = 0.8
NAMES = list(SCHEMAS)


def _request(i: int, constrained: bool, args: argparse.Namespace, max_tokens: int) -> dict:
    """Request i: its schema, prompt and seed are the same in both phases."""
    name = NAMES[i % len(NAMES)]
    body = {
        "messages": [{"role": "user", "content": f"Write one {name} record as JSON. Record {i}."}],
        "temperature": args.temperature,
        "seed": i,
        "max_tokens": max_tokens,
    }
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name][0]}}
    else:
        body["ignore_eos"] = True
    return body


async def _phase(base_url: str, bodies: list[dict], concurrency: int) -> dict:
    """Closed loop: `concurrency` clients take the next body as soon as their last returns."""
    queue = list(enumerate(bodies))[::-1]
    replies: list[dict | None] = [None] * len(bodies)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            i, body = queue.pop()
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            replies[i] = response.json()

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = [r["usage"]["completion_tokens"] for r in replies]
    return {"wall_s": wall, "requests": len(replies), "output_tokens": sum(tokens),
            "mean_output_tokens": statistics.mean(tokens), "output_tok_s": sum(tokens) / wall, "replies": replies,
            "lengths": tokens}


def _check_json(replies: list[dict]) -> dict:
    finished = parsed = 0
    for reply in replies:
        choice = reply["choices"][0]
        finished += choice["finish_reason"] == "stop"
        try:
            json.loads(choice["message"]["content"])
            parsed += 1
        except json.JSONDecodeError:
            pass
    return {"finished_by_grammar": finished, "parsed": parsed}


def run(args: argparse.Namespace, model_dir: Path, name: str) -> dict:
    base_url = f"http://127.0.0.1:{args.port}"
    cmd = server_cmd("coserve", model_dir, name, args.port)
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with running_server("coserve", cmd, args.port, WORK / "logs" / "structured-coserve.log") as proc:
        wait_healthy(base_url, proc)
        # Warm-up: every prompt once, so that both phases find them in the prefix cache
        # alike, and each schema once, so that its grammar is compiled before timing.
        warm = [_request(i, False, args, 1) for i in range(args.requests)]
        warm += [_request(i, True, args, 8) for i in range(len(NAMES))]
        asyncio.run(_phase(base_url, warm, args.concurrency))
        lengths = [args.max_tokens] * args.requests
        for label, constrained in (("constrained", True), ("unconstrained", False)):
            results[f"{label}_quiet_before"] = wait_for_quiet(args.quiet_wait)
            print(f"[structured] {label}: {args.requests} requests, {args.concurrency} in flight", flush=True)
            bodies = [_request(i, constrained, args, lengths[i]) for i in range(args.requests)]
            with ForeignCpu() as foreign:
                phase = asyncio.run(_phase(base_url, bodies, args.concurrency))
            phase["foreign_cpu_share"] = foreign.share
            replies = phase.pop("replies")
            if constrained:
                phase.update(_check_json(replies))
                lengths = phase["lengths"]  # the unconstrained phase decodes as many per request
            results[label] = phase
            print(f"[structured] {label}: {phase['output_tok_s']:.1f} output tok/s "
                  f"(foreign CPU {foreign.share:.0%})", flush=True)
    results["ratio"] = results["constrained"]["output_tok_s"] / results["unconstrained"]["output_tok_s"]
    return results


def report(results: dict) -> str:
    m = results["machine"]
    c, u = results["constrained"], results["unconstrained"]
    dirty = results.get("uncommitted_changes")
    verdict = "met" if results["ratio"] >= TARGET else "missed"
    lines = [
        f"# Structured outputs: throughput with and without json_schema, {results['date']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM. coserve commit {m['coserve_commit']}"
        + (f" plus uncommitted changes ({', '.join(x.strip() for x in dirty)})" if dirty else "") + ".",
        f"Command: `{results['command']}`. Model: {results['model']}; {results['settings']['concurrency']} "
        f"closed-loop clients, {results['settings']['requests']} chat requests per phase, temperature "
        f"{results['settings']['temperature']}, a seed per request; the unconstrained phase uses ignore_eos and "
        f"each request's constrained output length as its max_tokens.",
        "",
        "| phase | requests | output tokens | mean tokens / request | wall s | output tok/s | foreign CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, p in (("json_schema", c), ("unconstrained", u)):
        lines.append(f"| {label} | {p['requests']} | {p['output_tokens']} | {p['mean_output_tokens']:.1f} | "
                     f"{p['wall_s']:.1f} | {p['output_tok_s']:.1f} | {p['foreign_cpu_share']:.0%} |")
    lines += [
        "",
        f"Constrained / unconstrained output throughput: **{results['ratio']:.2f}** (target {TARGET}: {verdict}).",
        f"Constrained outputs finished by their grammar: {c['finished_by_grammar']}/{c['requests']}, parsing as "
        f"JSON: {c['parsed']}/{c['requests']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128, help="requests per phase")
    ap.add_argument("--max-tokens", type=int, default=400, help="the constrained requests' max_tokens")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--port", type=int, default=8331)
    ap.add_argument("--quiet-wait", type=float, default=60)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, WORK)
    started = dt.datetime.now()
    results = {**result_header(started, name),
               "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
               "uncommitted_changes": uncommitted_changes()}
    results.update(run(args, model_dir, name))
    results["wall_s"] = (dt.datetime.now() - started).total_seconds()
    write_run(results, report(results), args.out_dir, started, "structured")


if __name__ == "__main__":
    main()
