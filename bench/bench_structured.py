"""Output throughput with and without guided decoding, 32 requests in flight, one run.

One command per workload, from the repository root:

    .venv/bin/python bench/bench_structured.py                    # json_schema
    .venv/bin/python bench/bench_structured.py --workload tools   # tool calling

Starts coserve on the default model (its own process group, the port checked free,
stopped afterwards) and runs, for each mode of the workload, two phases against it, each
first waiting for the machine to go quiet:
  * constrained: chat completions under the mode, temperature 0.7, a seed per request;
  * unconstrained: the same prompts and seeds with no constraint, `ignore_eos`, and as
    max_tokens each request's output length in the constrained phase: both phases prefill
    the same and decode the same number of tokens per request, and their batches drain
    alike at the end (what is left to differ is the cost of guided decoding).
Workloads and their modes:
  * json_schema: `response_format` json_schema, cycling through the schemas of
    bench/grammar_schemas.py (nested objects, arrays, enums, bounded numbers);
  * tools: the same four schemas as the `parameters` of four functions, all offered in
    every request; modes `named` (tool_choice naming request i's function), `required`
    (tool_choice "required", parallel_tool_calls false: one call of the model's choice)
    and `auto` (the default: text, calls or both; a grammar holds every call). All three
    run under a grammar. The unconstrained requests carry no tools but the same prompt:
    the default model's template has no tool support, so the tools request renders as
    the fallback's system message (server/tools/fallback.py), which the unconstrained
    request sends itself; the report checks that both phases' prompt tokens are equal.
32 closed-loop clients each send requests back to back (--requests per phase), so the
batch stays full but for the tail. A warm-up sends every prompt once first (all phases
then find them in the prefix cache) and each grammar once (compiled before timing).
Output throughput = completion tokens / wall time. The constrained outputs are checked:
finished by the grammar, parsing as JSON, tool calls' arguments validating against
their function's schema (jsonschema). Records the foreign CPU share of each phase
(bench/cpu_monitor.py); rerun when it is high. Writes
bench/results/<date>-<time>-structured.json and .md. Target: each mode at least 0.8 of
unconstrained.
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
import jsonschema

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_load import running_server, write_run  # noqa: E402
from bench.bench_prefix import uncommitted_changes  # noqa: E402
from bench.bench_serving import WORK, result_header, server_cmd, wait_healthy  # noqa: E402
from bench.cpu_monitor import ForeignCpu, wait_for_quiet  # noqa: E402
from bench.grammar_schemas import SCHEMAS  # noqa: E402
from server.tools.fallback import tools_section  # noqa: E402

TARGET = 0.8
NAMES = list(SCHEMAS)
WORKLOADS = {"json_schema": ("json_schema",), "tools": ("named", "required", "auto")}
TOOLS = [{"type": "function", "function": {"name": f"record_{name}", "description": f"Store one {name} record",
                                           "parameters": SCHEMAS[name][0]}} for name in NAMES]


def _request(i: int, mode: str | None, args: argparse.Namespace, max_tokens: int) -> dict:
    """Request i under `mode` (None: unconstrained): its schema, prompt and seed are the
    same in every phase of the workload."""
    name = NAMES[i % len(NAMES)]
    body = {"temperature": args.temperature, "seed": i, "max_tokens": max_tokens}
    if args.workload == "json_schema":
        body["messages"] = [{"role": "user", "content": f"Write one {name} record as JSON. Record {i}."}]
        if mode is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name][0]}}
    else:
        ask = {"role": "user", "content": f"Store one {name} record with record_{name}. Record {i}."}
        if mode is None:  # the prompt the tools request renders to, sent as such
            body["messages"] = [{"role": "system", "content": tools_section(TOOLS)}, ask]
        else:
            body["messages"] = [ask]
            body["tools"] = TOOLS
            if mode == "named":
                body["tool_choice"] = {"type": "function", "function": {"name": f"record_{name}"}}
            elif mode == "required":
                body.update(tool_choice="required", parallel_tool_calls=False)
    if mode is None:
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


def _check_tools(replies: list[dict]) -> dict:
    """Calls made, and how many of them parse and validate against their function."""
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    calling = calls = valid = 0
    finish: dict[str, int] = {}
    for reply in replies:
        choice = reply["choices"][0]
        finish[choice["finish_reason"]] = finish.get(choice["finish_reason"], 0) + 1
        made = choice["message"].get("tool_calls") or []
        calling += bool(made)
        for call in made:
            calls += 1
            try:
                jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
                valid += 1
            except (json.JSONDecodeError, jsonschema.ValidationError, KeyError):
                pass
    return {"finish_reasons": finish, "replies_with_calls": calling, "calls": calls, "valid_calls": valid}


def run(args: argparse.Namespace, model_dir: Path, name: str) -> dict:
    base_url = f"http://127.0.0.1:{args.port}"
    cmd = server_cmd("coserve", model_dir, name, args.port)
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    modes = WORKLOADS[args.workload]
    results: dict = {"modes": {}}
    with running_server("coserve", cmd, args.port, WORK / "logs" / "structured-coserve.log") as proc:
        wait_healthy(base_url, proc)
        # Warm-up: every prompt once, so that all phases find them in the prefix cache
        # alike, and each grammar once (a named function's per function), so that it is
        # compiled before timing.
        warm = [_request(i, None, args, 1) for i in range(args.requests)]
        warm += [_request(i, mode, args, 8) for mode in modes for i in range(len(NAMES))]
        asyncio.run(_phase(base_url, warm, args.concurrency))
        for mode in modes:
            lengths = [args.max_tokens] * args.requests
            entry: dict = {}
            for label, constrained in (("constrained", True), ("unconstrained", False)):
                entry[f"{label}_quiet_before"] = wait_for_quiet(args.quiet_wait)
                print(f"[structured] {mode} {label}: {args.requests} requests, {args.concurrency} in flight",
                      flush=True)
                bodies = [_request(i, mode if constrained else None, args, lengths[i]) for i in range(args.requests)]
                with ForeignCpu() as foreign:
                    phase = asyncio.run(_phase(base_url, bodies, args.concurrency))
                phase["foreign_cpu_share"] = foreign.share
                replies = phase.pop("replies")
                phase["prompt_tokens"] = [r["usage"]["prompt_tokens"] for r in replies]
                if constrained:
                    phase.update(_check_json(replies) if args.workload == "json_schema" else _check_tools(replies))
                    lengths = [max(n, 1) for n in phase["lengths"]]  # the unconstrained phase decodes as many
                entry[label] = phase
                print(f"[structured] {mode} {label}: {phase['output_tok_s']:.1f} output tok/s "
                      f"(foreign CPU {foreign.share:.0%})", flush=True)
            entry["ratio"] = entry["constrained"]["output_tok_s"] / entry["unconstrained"]["output_tok_s"]
            entry["same_prompts"] = entry["constrained"]["prompt_tokens"] == entry["unconstrained"]["prompt_tokens"]
            results["modes"][mode] = entry
    return results


MODE_LABELS = {"json_schema": "json_schema", "named": 'tools, named function',
               "required": 'tools, "required"', "auto": 'tools, "auto"'}


def _checks(mode: str, c: dict) -> str:
    if mode == "json_schema":
        return (f"{MODE_LABELS[mode]}: finished by the grammar {c['finished_by_grammar']}/{c['requests']}, "
                f"parsing as JSON {c['parsed']}/{c['requests']}.")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(c["finish_reasons"].items()))
    return (f"{MODE_LABELS[mode]}: {c['replies_with_calls']}/{c['requests']} replies with calls, "
            f"{c['valid_calls']}/{c['calls']} calls validating against their function's schema; finish reasons: "
            f"{reasons}.")


def report(results: dict) -> str:
    m = results["machine"]
    settings = results["settings"]
    dirty = results.get("uncommitted_changes")
    workload = settings["workload"]
    what = "json_schema" if workload == "json_schema" else "tools (named function, \"required\", \"auto\")"
    lines = [
        f"# Structured outputs: throughput with and without {what}, {results['date']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM. coserve commit {m['coserve_commit']}"
        + (f" plus uncommitted changes ({', '.join(x.strip() for x in dirty)})" if dirty else "") + ".",
        f"Command: `{results['command']}`. Model: {results['model']}; {settings['concurrency']} "
        f"closed-loop clients, {settings['requests']} chat requests per phase, temperature "
        f"{settings['temperature']}, a seed per request; each unconstrained phase uses ignore_eos and "
        f"each request's constrained output length as its max_tokens"
        + ("; its prompt is the one the tools request renders to." if workload == "tools" else "."),
        "",
        "| mode | phase | requests | output tokens | mean tokens / request | wall s | output tok/s | foreign CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, entry in results["modes"].items():
        for label in ("constrained", "unconstrained"):
            p = entry[label]
            lines.append(f"| {MODE_LABELS[mode]} | {label} | {p['requests']} | {p['output_tokens']} | "
                         f"{p['mean_output_tokens']:.1f} | {p['wall_s']:.1f} | {p['output_tok_s']:.1f} | "
                         f"{p['foreign_cpu_share']:.0%} |")
    lines += ["", "| mode | constrained / unconstrained output tok/s | target | same prompt tokens |", "|---|---:|---|---|"]
    for mode, entry in results["modes"].items():
        verdict = "met" if entry["ratio"] >= TARGET else "missed"
        lines.append(f"| {MODE_LABELS[mode]} | **{entry['ratio']:.2f}** | {TARGET}: {verdict} | "
                     f"{'yes' if entry['same_prompts'] else 'no'} |")
    lines += ["", *(_checks(mode, entry["constrained"]) for mode, entry in results["modes"].items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=list(WORKLOADS), default="json_schema",
                    help="json_schema: response_format; tools: named, required and auto tool calling")
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
