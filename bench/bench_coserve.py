"""Co-serving benchmark: LoRA finetuning in the serving engine, against separate systems.

One command, from the repository root (vLLM's venv first, for its load generator:
`bash bench/setup_vllm.sh`):

    .venv/bin/python bench/bench_coserve.py            # ~30 min on 2 cores
    .venv/bin/python bench/bench_coserve.py --smoke    # end to end in a few minutes

Every inference load is sent by vLLM's own load generator, `vllm bench serve` (run from
bench/.vllm-venv, built and read by bench/bench_load.py's bench_cmd, run_bench and
summarize): --num-requests streaming /v1/completions of --input-len random prompt tokens
x --output-len output tokens, ignore_eos, --temperature (1.0), Poisson arrivals
at the rate, one fixed seed (so every scenario at a rate gets the same prompts and the
same arrival times). On the default model (SmolLM2-135M-Instruct), with one
`coserve serve` started with the TPOT/TTFT SLOs given here, it measures:
  1. inference alone: first every request at once (rate inf), whose request
     throughput is the inference-alone capacity; then at each rate: --capacity-fractions
     of that capacity (0.25, 0.5, 0.75 by default, rounded to 0.01 req/s) and any
     --rates given in req/s;
  2. finetuning alone: a finetuning job (a chat JSONL made up here, 64 examples of
     ~120-200 tokens, LoRA rank 16 on all projections, batch size 4: the server's
     "auto") on the otherwise
     idle server, for --finetune-seconds (longer until 3 steps fell inside);
  3. co-served: a fresh job of the same kind running while the load of 1. runs, per rate;
  4. separate systems: the server doing inference only, at each rate, while a plain
     transformers + PEFT trainer (bench/trainer_baseline.py: same data, tokens, LoRA
     settings and AdamW schedule) trains in its own process on the same cores; and
     that trainer alone, for --finetune-seconds, as its standalone throughput.
Finetuning throughput is trained (loss-bearing) tokens per second over the optimizer
steps that began and ended inside the measurement window, from each step's own timing:
the job's `metrics` events (`tokens_trained`, `tokens_per_second`), the trainer's JSON
lines. A job or trainer is started first and the window opens after its first step,
so start-up costs stay out; under load the window is the load's own span, from the
first request sent to the last token received (vLLM's per-request start times, on the
same monotonic clock), so the client's start-up stays out too. Inference: vLLM's TTFT,
TPOT and ITL p50/p99, and SLO attainment from its per-request lists (--save-detailed):
the share of requests with TTFT <= --ttft-slo-ms and TPOT <= --tpot-slo-ms, a request's
TPOT being the sum of its inter-token latencies over its output tokens less one, as vLLM
computes it (a failed request misses both).

Each phase first waits (--quiet-wait s) for other processes to leave the CPU and records
the share they took anyway ("foreign CPU %"). The issue's targets are checked at the
rate closest to half the inference-alone capacity (the highest request throughput
measured, normally at rate inf): finetuning keeps >= 60% of its standalone throughput
with >= 99% of requests inside the TPOT SLO, and has >= 2x the separate trainer's
throughput at equal or better SLO attainment. Writes bench/results/<date>-<time>-coserve.json,
.md and .png. Needs matplotlib in the venv (.venv/bin/python -m pip install matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_load import SEED, VLLM_CLI, WARMUP_PROMPT, bench_cmd, run_bench, summarize  # noqa: E402
from bench.bench_serving import BENCH, WORK, result_header, stop, wait_healthy  # noqa: E402
from bench.cpu_monitor import ForeignCpu, wait_for_quiet  # noqa: E402
from bench.loadgen import warmup  # noqa: E402
from bench.prompts import make_prompts  # noqa: E402

PYTHON = str(REPO / ".venv/bin/python")
NUM_EXAMPLES = 64
# Jobs are cancelled when their window closes; this only has to outlast the longest window.
N_EPOCHS = 50
# How often the job's events are read: the error in placing a step inside a window.
POLL_S = 0.5
# A standalone window is extended (by at most MAX_EXTENSION_S) until it holds this many steps.
MIN_STANDALONE_STEPS = 3
MAX_EXTENSION_S = 600
RAW = WORK / "coserve-raw"  # vllm bench serve's own result files, one per phase (overwritten per run)
TARGET_KEEP = 0.6
TARGET_TPOT_ATTAINMENT = 0.99
TARGET_SPEEDUP = 2.0


# ---------------------------------------------------------------- training data


def training_jsonl(tokenizer, num_examples: int) -> bytes:
    """Chat examples of a user turn (24-48 tokens) and an answer (60-130) from seeded pseudo-text."""
    questions = make_prompts(tokenizer, num_examples, 24, 48, seed=11)
    answers = make_prompts(tokenizer, num_examples, 60, 130, seed=12)
    lines = [
        json.dumps({"messages": [{"role": "user", "content": tokenizer.decode(q)},
                                 {"role": "assistant", "content": tokenizer.decode(a)}]})
        for q, a in zip(questions, answers, strict=True)
    ]
    return "\n".join(lines).encode()


def data_summary(path: Path, tokenizer) -> dict:
    """Sizes as the server renders the file (its chat template adds a system turn)."""
    from server.finetune.job_request import DEFAULT_MAX_SEQ_LEN
    from server.finetune.training_data import render_training_file

    examples = render_training_file(path, tokenizer, DEFAULT_MAX_SEQ_LEN)
    lengths = [len(e.token_ids) for e in examples]
    return {"examples": len(examples), "tokens": sum(lengths), "min_len": min(lengths), "max_len": max(lengths),
            "target_tokens": sum(sum(e.target[1:]) for e in examples)}


# ---------------------------------------------------------------- trainers


@dataclass(frozen=True)
class Step:
    seen: float  # time.monotonic() when the benchmark learnt of the step
    batch_tokens: int  # trained tokens of the step
    seconds: float  # the step's duration, as its trainer timed it


def window_throughput(steps: list[Step], start: float, end: float) -> dict:
    """Trained tokens/s over the steps that began and ended inside [start, end]."""
    inside = [s for s in steps if s.seen - s.seconds >= start and s.seen <= end]
    seconds = sum(s.seconds for s in inside)
    tokens = sum(s.batch_tokens for s in inside)
    return {"tokens_per_s": tokens / seconds if seconds else None, "steps": len(inside), "tokens": tokens,
            "step_seconds": seconds}


class CoserveJob:
    """A finetuning job on the server, its steps read from its metrics events."""

    def __init__(self, client, model: str, file_id: str, batch_size: int):
        self.client = client
        self.model = model
        self.file_id = file_id
        self.batch_size = batch_size
        self._seen: dict[int, tuple[float, int, float]] = {}  # step -> (seen, tokens_trained, tokens/s)

    async def start(self, timeout: float = 600) -> None:
        job = await self.client.fine_tuning.jobs.create(
            model=self.model, training_file=self.file_id, suffix="bench", seed=0,
            hyperparameters={"n_epochs": N_EPOCHS, "batch_size": self.batch_size})
        self.id = job.id
        self._poller = asyncio.create_task(self._poll())
        deadline = time.monotonic() + timeout
        while not self._seen:
            job = await self.client.fine_tuning.jobs.retrieve(self.id)
            if job.status not in ("validating_files", "queued", "running"):
                raise RuntimeError(f"job {self.id} is {job.status} before its first step: {job.error}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {self.id} made no step in {timeout:.0f}s")
            await asyncio.sleep(POLL_S)

    async def _poll(self) -> None:
        while True:
            page = await self.client.fine_tuning.jobs.list_events(self.id, limit=100)
            now = time.monotonic()
            for event in page.data:
                if event.type == "metrics" and event.data["step"] not in self._seen:
                    d = event.data
                    self._seen[d["step"]] = (now, d["tokens_trained"], d["tokens_per_second"])
            await asyncio.sleep(POLL_S)

    @property
    def steps(self) -> list[Step]:
        tokens_after = {step: tokens for step, (_, tokens, _) in self._seen.items()}
        tokens_after[0] = 0
        steps = []
        for step, (seen, tokens, rate) in sorted(self._seen.items()):
            # A step's own tokens are the growth of the running total; a step whose
            # predecessor was not seen (it never happens at POLL_S) is left out.
            if step - 1 in tokens_after and rate > 0:
                batch = tokens - tokens_after[step - 1]
                steps.append(Step(seen, batch, batch / rate))
        return steps

    async def stop(self) -> None:
        self._poller.cancel()
        await self.client.fine_tuning.jobs.cancel(self.id)
        await self.client.close()


class BaselineTrainer:
    """bench/trainer_baseline.py in its own process, its steps read from its JSON lines."""

    def __init__(self, model_dir: Path, training_file: Path, batch_size: int, log: Path):
        self.cmd = [PYTHON, str(BENCH / "trainer_baseline.py"), "--model-dir", str(model_dir),
                    "--training-file", str(training_file), "--n-epochs", str(N_EPOCHS),
                    "--batch-size", str(batch_size)]
        self.log = log
        self.steps: list[Step] = []

    async def start(self, timeout: float = 600) -> None:
        with open(self.log, "w") as logf:
            self.proc = await asyncio.create_subprocess_exec(*self.cmd, cwd=REPO, stdout=asyncio.subprocess.PIPE,
                                                             stderr=logf)
        self._reader = asyncio.create_task(self._read())
        deadline = time.monotonic() + timeout
        while not self.steps:
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"trainer made no step (exit {self.proc.returncode}): {tail(self.log)}")
            await asyncio.sleep(0.2)

    async def _read(self) -> None:
        async for line in self.proc.stdout:
            if not line.startswith(b"{"):
                continue  # a library's message on stdout, not a step
            record = json.loads(line)
            self.steps.append(Step(time.monotonic(), record["batch_tokens"], record["seconds"]))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()
        await self._reader


def tail(path: Path, n: int = 10) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------- load


@dataclass(frozen=True)
class Load:
    """What `vllm bench serve` sends, and the SLOs its requests are held to."""

    name: str
    model_dir: Path
    port: int
    num_requests: int
    input_len: int
    output_len: int
    temperature: float
    ttft_slo_ms: float
    tpot_slo_ms: float

    def run(self, tag: str, rate: str) -> tuple[list[str], dict]:
        """One `vllm bench serve` at `rate` (req/s, or inf: all at once): its command and whole result."""
        result_file = RAW / f"{tag}.json"
        # One seed for all: each scenario at a rate gets the same prompts and arrival times
        # (coserve has no prefix cache for repeated prompts to hit).
        cmd = bench_cmd(self.name, self.model_dir, self.port, self.num_requests, rate, None, self.input_len,
                        self.output_len, SEED, self.temperature, result_file)
        print(f"[coserve-bench] {shlex.join(cmd)}", flush=True)
        raw = run_bench(cmd, result_file, WORK / "logs" / f"coserve-bench-{tag}.log")
        if "error" in raw:
            raise RuntimeError(raw["error"])
        return cmd, raw


@dataclass(frozen=True)
class Request:
    start: float  # when it was sent: vLLM's time.perf_counter(), time.monotonic()'s clock on Linux
    ok: bool
    ttft: float = 0.0  # s
    tpot: float = 0.0  # s; 0 for one token, which has no time per output token and cannot miss a TPOT SLO
    end: float = 0.0  # when its last token came


def requests(raw: dict) -> list[Request]:
    """The requests of a `vllm bench serve --save-detailed` result. TPOT as vLLM computes it: the
    time from the first token to the last (the summed inter-token latencies) over the tokens after
    the first."""
    out = []
    for start, ttft, itls, tokens, error in zip(raw["start_times"], raw["ttfts"], raw["itls"], raw["output_lens"],
                                                raw["errors"], strict=True):
        if not tokens or error:  # vLLM counts a failed request's output as 0 tokens
            out.append(Request(start, False))
            continue
        decode = sum(itls)
        out.append(Request(start, True, ttft, decode / (tokens - 1) if tokens > 1 else 0.0, start + ttft + decode))
    return out


def slo_attainment(reqs: list[Request], ttft_slo_ms: float, tpot_slo_ms: float) -> dict:
    """Shares of all requests inside the SLOs; a failed request misses both."""
    ttft_ok = [r.ok and r.ttft * 1000 <= ttft_slo_ms for r in reqs]
    tpot_ok = [r.ok and r.tpot * 1000 <= tpot_slo_ms for r in reqs]
    return {
        "slo_attainment": sum(a and b for a, b in zip(ttft_ok, tpot_ok, strict=True)) / len(reqs),
        "tpot_slo_attainment": sum(tpot_ok) / len(reqs),
        "ttft_slo_attainment": sum(ttft_ok) / len(reqs),
    }


async def measure(load: Load, rate: str | None, trainer: CoserveJob | BaselineTrainer | None,
                  window_s: float, tag: str = "") -> dict:
    """Run the trainer (if any) and the load at `rate` (if any, else train alone for `window_s`) together."""
    if trainer:
        await trainer.start()
    try:
        with ForeignCpu() as foreign:
            start = time.monotonic()
            result: dict = {}
            if rate is not None:
                # In a thread: this event loop reads the trainer's steps meanwhile.
                cmd, raw = await asyncio.to_thread(load.run, tag, rate)
                reqs = requests(raw)
                result = {**summarize(raw), **slo_attainment(reqs, load.ttft_slo_ms, load.tpot_slo_ms),
                          "bench_command": shlex.join(cmd)}
                # The window is the load's span, from the first request sent to the last token
                # received: the client's start-up (importing vLLM, loading a tokenizer) stays out.
                start = min(r.start for r in reqs)
                end = max((r.end for r in reqs if r.ok), default=time.monotonic())
            else:
                await asyncio.sleep(window_s)
                # Under foreign load one step can outlast the window, and a rate needs whole steps.
                while (window_throughput(trainer.steps, start, time.monotonic())["steps"] < MIN_STANDALONE_STEPS
                       and time.monotonic() < start + window_s + MAX_EXTENSION_S):
                    await asyncio.sleep(POLL_S)
                end = time.monotonic()
    finally:
        if trainer:
            await trainer.stop()
    result.update(window_s=end - start, foreign_cpu_share=foreign.share)
    if trainer:
        result["finetune"] = window_throughput(trainer.steps, start, end)
    return result


def phase(label: str, quiet_wait: float, run) -> dict:
    """One measurement after a quiet CPU; a failure is recorded, and the run goes on."""
    print(f"[coserve-bench] {label}", flush=True)
    wait_for_quiet(quiet_wait)
    try:
        result = asyncio.run(run())
    except Exception as e:  # noqa: BLE001 - a failed phase is a result to report
        result = {"error": f"{type(e).__name__}: {e}"}
    print(f"[coserve-bench] {label}: {json.dumps(brief(result))}", flush=True)
    return result


def brief(result: dict) -> dict:
    keys = ("finetune", "request_throughput", "p99_ttft_ms", "p99_tpot_ms", "slo_attainment", "tpot_slo_attainment",
            "foreign_cpu_share", "error")
    return {k: result[k] for k in keys if k in result}


def rates_to_run(args: argparse.Namespace, capacity_rps: float | None) -> list[float]:
    """--capacity-fractions of the measured capacity (to 0.01 req/s) and the --rates given, ascending."""
    derived = [max(0.01, round(f * capacity_rps, 2)) for f in args.capacity_fractions] if capacity_rps else []
    return sorted(set(args.rates) | set(derived))


# ---------------------------------------------------------------- runs


def run_all(args: argparse.Namespace, model_dir: Path, name: str, training_file: Path, data_dir: Path,
            results: dict) -> None:
    """Every phase against one server (jobs come after the inference-only phases)."""
    import openai

    cmd = [PYTHON, "-m", "server.cli", "serve", "--model", str(model_dir), "--served-model-name", name,
           "--port", str(args.port), "--data-dir", str(data_dir), "--ttft-slo-ms", str(args.ttft_slo_ms),
           "--tpot-slo-ms", str(args.tpot_slo_ms)]
    results["server_command"] = shlex.join(cmd)
    server_log = WORK / "logs" / "server-coserve-bench.log"
    print(f"[coserve-bench] {shlex.join(cmd)}  (log: {server_log})", flush=True)
    base_url = f"http://127.0.0.1:{args.port}"
    load = Load(name, model_dir, args.port, args.num_requests, args.input_len, args.output_len, args.temperature,
                args.ttft_slo_ms, args.tpot_slo_ms)
    phases = results["phases"] = {"inference_alone": {}, "separate": {}, "coserved": {}}
    results["rates"] = []
    with open(server_log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(base_url, proc)
        asyncio.run(warmup(base_url, name, WARMUP_PROMPT, output_len=16))
        file_id = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused").files.create(
            file=("train.jsonl", io.BytesIO(training_file.read_bytes())), purpose="fine-tune").id

        def job() -> CoserveJob:
            return CoserveJob(openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0),
                              name, file_id, args.batch_size)

        def trainer() -> BaselineTrainer:
            return BaselineTrainer(model_dir, training_file, args.batch_size, WORK / "logs" / "trainer-baseline.log")

        def per_rate(key: str, label: str, make_trainer) -> None:
            for rate in rates:
                phases[key][str(rate)] = phase(f"{label} @ {rate} req/s", args.quiet_wait, lambda rate=rate: measure(
                    load, str(rate), make_trainer() if make_trainer else None, 0, tag=f"{key}-{rate}"))

        phases["inference_alone"]["inf"] = phase("inference alone @ inf req/s (capacity)", args.quiet_wait,
                                                 lambda: measure(load, "inf", None, 0, tag="inference_alone-inf"))
        rates = results["rates"] = rates_to_run(args, phases["inference_alone"]["inf"].get("request_throughput"))
        print(f"[coserve-bench] rates: {rates} req/s", flush=True)
        per_rate("inference_alone", "inference alone", None)
        phases["trainer_alone"] = phase("PEFT trainer alone", args.quiet_wait,
                                        lambda: measure(load, None, trainer(), args.finetune_seconds))
        per_rate("separate", "separate systems", trainer)
        phases["finetune_alone"] = phase("coserve finetuning alone", args.quiet_wait,
                                         lambda: measure(load, None, job(), args.finetune_seconds))
        per_rate("coserved", "co-served", job)
    except Exception as e:  # noqa: BLE001 - keep what was measured before the server failed
        results["error"] = f"{type(e).__name__}: {e}\n{tail(server_log)}"
    finally:
        stop(proc)


# ---------------------------------------------------------------- analysis


def finetune_rate(result: dict | None) -> float | None:
    return ((result or {}).get("finetune") or {}).get("tokens_per_s")


def capacity(inference_alone: dict, rates: list[float]) -> dict:
    """Inference-alone capacity, the highest request throughput measured alone (normally with every
    request at once, rate inf), and the per-rate phases' rate closest to half of it."""
    measured = {r: m for r, m in inference_alone.items() if "request_throughput" in m}
    if not measured:
        return {}
    at = max(measured, key=lambda r: measured[r]["request_throughput"])
    peak = measured[at]["request_throughput"]
    return {"requests_per_s": peak, "output_tokens_per_s": measured[at]["output_throughput"], "measured_at_rate": at,
            "half_capacity_rate": min(rates, key=lambda r: abs(r - peak / 2), default=None)}


def targets(results: dict) -> dict:
    """The issue's two targets at the half-capacity rate; `met` is None where a number is missing."""
    phases = results["phases"]
    rate = results["capacity"].get("half_capacity_rate")
    co = phases["coserved"].get(str(rate), {})
    sep = phases["separate"].get(str(rate), {})
    co_rate, alone, sep_rate = finetune_rate(co), finetune_rate(phases.get("finetune_alone")), finetune_rate(sep)
    keep = co_rate / alone if co_rate is not None and alone else None
    speedup = co_rate / sep_rate if co_rate is not None and sep_rate else None
    tpot_att, att, sep_att = co.get("tpot_slo_attainment"), co.get("slo_attainment"), sep.get("slo_attainment")
    return {
        "rate": rate,
        "keep": {"fraction_of_standalone": keep, "tpot_slo_attainment": tpot_att,
                 "met": None if keep is None or tpot_att is None
                 else keep >= TARGET_KEEP and tpot_att >= TARGET_TPOT_ATTAINMENT},
        "vs_separate": {"speedup": speedup, "slo_attainment": att, "separate_slo_attainment": sep_att,
                        "met": None if speedup is None or att is None or sep_att is None
                        else speedup >= TARGET_SPEEDUP and att >= sep_att},
    }


# ---------------------------------------------------------------- report


SCENARIOS = [  # (label, phase key, measured per rate, phase key of the standalone trainer to compare with)
    ("inference alone", "inference_alone", True, None),
    ("finetune alone (coserve)", "finetune_alone", False, "finetune_alone"),
    ("co-served", "coserved", True, "finetune_alone"),
    ("finetune alone (PEFT trainer)", "trainer_alone", False, "trainer_alone"),
    ("separate systems", "separate", True, "trainer_alone"),
]


def fmt(value, scale: float = 1, digits: int = 1, unit: str = "") -> str:
    return f"{value * scale:.{digits}f}{unit}" if isinstance(value, (int, float)) else "n/a"


def table(results: dict) -> list[str]:
    phases = results["phases"]
    lines = ["| scenario | rate req/s | served req/s | finetune tok/s | x standalone | TTFT p50 ms | TTFT p99 ms "
             "| TPOT p50 ms | TPOT p99 ms | SLO attainment % | TPOT SLO % | foreign CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, key, per_rate, standalone in SCENARIOS:
        entry = phases.get(key, {})
        for rate, m in (entry.items() if per_rate else [("-", entry)]):
            ft, base = finetune_rate(m), finetune_rate(phases.get(standalone)) if standalone else None
            keep = f"{ft / base:.2f}" if ft is not None and base else "-"
            if "error" in m:
                lines.append(f"| {label} | {rate} | error: `{m['error'].splitlines()[0]}` |" + " |" * 9)
                continue
            finetune = fmt(ft) if standalone else "-"
            lines.append(f"| {label} | {rate} | {fmt(m.get('request_throughput'), digits=2)} | {finetune} | {keep} "
                         f"| {fmt(m.get('p50_ttft_ms'), digits=0)} | {fmt(m.get('p99_ttft_ms'), digits=0)} "
                         f"| {fmt(m.get('p50_tpot_ms'), digits=0)} | {fmt(m.get('p99_tpot_ms'), digits=0)} "
                         f"| {fmt(m.get('slo_attainment'), 100)} "
                         f"| {fmt(m.get('tpot_slo_attainment'), 100)} | {fmt(m.get('foreign_cpu_share'), 100)} |")
    return lines


def verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "**not measured**"}[met]


def target_lines(results: dict) -> list[str]:
    cap, t, s = results["capacity"], results["targets"], results["settings"]
    if not cap:
        return ["Inference alone was not measured, so the targets cannot be checked."]
    where = ("every request at once" if cap["measured_at_rate"] == "inf"
             else f"at {cap['measured_at_rate']} req/s, above what every request at once gave")
    checked = (f"Targets are checked at {t['rate']} req/s, the measured rate closest to half of it."
               if t["rate"] is not None else "No per-rate phase ran, so the targets cannot be checked.")
    keep, sep = t["keep"], t["vs_separate"]
    return [
        f"Inference-alone capacity: {cap['requests_per_s']:.2f} req/s ({cap['output_tokens_per_s']:.1f} output "
        f"tok/s), the highest request throughput measured alone ({where}). {checked}",
        "",
        f"- Finetuning keeps >= {TARGET_KEEP:.0%} of its standalone throughput with >= {TARGET_TPOT_ATTAINMENT:.0%} "
        f"of requests inside the TPOT SLO ({s['tpot_slo_ms']:g} ms): {fmt(keep['fraction_of_standalone'], 100, unit='%')} "
        f"of standalone, {fmt(keep['tpot_slo_attainment'], 100, unit='%')} inside: {verdict(keep['met'])}.",
        f"- >= {TARGET_SPEEDUP:g}x the finetuning throughput of the separate-systems baseline at equal or better SLO "
        f"attainment: {fmt(sep['speedup'], digits=2, unit='x')}, SLO attainment {fmt(sep['slo_attainment'], 100, unit='%')} "
        f"against {fmt(sep['separate_slo_attainment'], 100, unit='%')}: {verdict(sep['met'])}.",
    ]


def rate_note(results: dict) -> str:
    s, rates = results["settings"], results.get("rates", [])
    parts = [f"{', '.join(f'{f:g}' for f in s['capacity_fractions'])} x the capacity"] if s["capacity_fractions"] else []
    parts += [f"{', '.join(f'{r:g}' for r in s['rates'])} req/s (--rates)"] if s["rates"] else []
    return f"{' and '.join(parts) or 'no rate'}: {', '.join(f'{r:g}' for r in rates) or 'none'} req/s"


def markdown(results: dict, plot_name: str) -> str:
    m, s, d = results["machine"], results["settings"], results["training_data"]
    lines = [
        f"# Co-serving inference and LoRA finetuning, {results['date']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM. torch {m['torch']}, "
        f"transformers {m['transformers']}, coserve {m['coserve_commit']}. Model {results['model']}, dtype `auto` "
        f"(the type the CPU GEMM probe measured fastest, in the server log); the PEFT trainer in float32.",
        "",
        f"Inference: `vllm bench serve` (vLLM {m['vllm']}), {s['num_requests']} streaming /v1/completions per "
        f"level, {s['input_len']} random prompt x {s['output_len']} output tokens, ignore_eos, temperature "
        f"{s['temperature']:g}, seed {SEED} (the same prompts and arrival times in every scenario at a rate); first "
        f"all at once (rate inf: the capacity), then Poisson arrivals at {rate_note(results)}. SLOs (server flags): "
        f"TTFT {s['ttft_slo_ms']:g} ms, TPOT {s['tpot_slo_ms']:g} ms. Finetuning: {d['examples']} chat examples ({d['min_len']}-{d['max_len']} "
        f"tokens, {d['target_tokens']} trained of {d['tokens']}), LoRA rank 16 / alpha 32 on all seven projections, "
        f"batch size {s['batch_size']}, AdamW at 1e-3; the coserve job also writes a checkpoint every 10 steps, the "
        f"PEFT trainer none. Standalone windows: at least {s['finetune_seconds']:g} s and "
        f"{MIN_STANDALONE_STEPS} steps.",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Server: `{results.get('server_command', 'not started')}`",
        "",
        *table(results),
        "",
        "served req/s: completed requests per second of the load's run; finetune tok/s: trained tokens per second "
        "over the optimizer steps that began and ended inside the window (under load: from the first request sent "
        "to the last token received; n/a: none did); x standalone: "
        "against the same trainer alone (the coserve job, or the PEFT trainer). SLO attainment: requests with "
        "TTFT and TPOT inside their SLOs; TPOT SLO: inside the TPOT SLO. Numbers with a high foreign CPU share "
        "are skewed by other processes.",
        "",
        "## Targets",
        "",
        *target_lines(results),
        "",
        f"![finetuning throughput and TPOT p99 against request rate]({plot_name})",
    ]
    if "error" in results:
        lines += ["", f"Run stopped early: `{results['error'].splitlines()[0]}`"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; write the file only
    import matplotlib.pyplot as plt

    phases, s = results["phases"], results["settings"]

    def series(key: str, value) -> tuple[list[float], list[float]]:
        points = sorted((float(r), value(m)) for r, m in phases.get(key, {}).items()
                        if r != "inf" and value(m) is not None)
        return [r for r, _ in points], [v for _, v in points]

    colors = {"inference_alone": "tab:green", "coserved": "tab:blue", "separate": "tab:orange"}
    fig, (ft, tpot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, key in (("co-served (coserve)", "coserved"), ("separate systems (PEFT trainer)", "separate")):
        ft.plot(*series(key, finetune_rate), marker="o", color=colors[key], label=label)
    for label, key, style in (("coserve job alone", "finetune_alone", "--"), ("PEFT trainer alone", "trainer_alone", ":")):
        if finetune_rate(phases.get(key)) is not None:
            ft.axhline(finetune_rate(phases[key]), linestyle=style, color="grey", label=label)
    ft.set(xlabel="request rate (req/s)", ylabel="finetuning tokens/s", title="Finetuning throughput under load")
    ft.set_ylim(bottom=0)
    for label, key in (("inference alone", "inference_alone"), ("co-served", "coserved"), ("separate systems", "separate")):
        tpot.plot(*series(key, lambda m: m.get("p99_tpot_ms")), marker="o", color=colors[key], label=label)
    tpot.axhline(s["tpot_slo_ms"], color="red", linestyle="--", label="TPOT SLO")
    tpot.set(xlabel="request rate (req/s)", ylabel="TPOT p99 (ms)", title="Inference TPOT p99")
    tpot.set_ylim(bottom=0)
    for ax in (ft, tpot):
        if results["capacity"]:
            ax.axvline(results["capacity"]["requests_per_s"] / 2, color="grey", linestyle="-.", linewidth=1,
                       label="half of inference-alone capacity")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results['model']} on {results['machine']['cores']} cores, {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda text: sorted({float(x) for x in text.split(",") if x.strip()})  # noqa: E731
    ap.add_argument("--capacity-fractions", type=floats, default=[0.25, 0.5, 0.75],
                    help="request rates as comma-separated fractions of the measured inference-alone capacity "
                         "(empty: none)")
    ap.add_argument("--rates", type=floats, default=[], help="further comma-separated request rates (req/s)")
    ap.add_argument("--num-requests", type=int, default=64, help="requests per load (the capacity's and each rate's)")
    ap.add_argument("--input-len", type=int, default=128, help="prompt length (tokens)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every request")
    ap.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="passed to the server; SLO attainment uses it")
    ap.add_argument("--tpot-slo-ms", type=float, default=200.0, help="passed to the server; SLO attainment uses it")
    ap.add_argument("--finetune-seconds", type=float, default=120.0,
                    help="measurement window of each trainer alone")
    # 1: on 2 cores a step of 4 examples takes ~10 s alone and far longer under load, too
    # coarse for windows of a minute; the engine trains one sequence at a time anyway.
    ap.add_argument("--batch-size", type=int, default=4,
                    help="examples per optimizer step, both trainers (default: the server's auto)")
    ap.add_argument("--port", type=int, default=8341)
    ap.add_argument("--quiet-wait", type=float, default=60,
                    help="seconds to wait, before each phase, for other processes to leave the CPU")
    ap.add_argument("--out-dir", type=Path, default=BENCH / "results")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script end to end: 8 requests of 32 output tokens per load, the rate of half "
                         "the capacity only, 20 s standalone windows")
    args = ap.parse_args()
    if any(r <= 0 or not math.isfinite(r) for r in args.rates + args.capacity_fractions):
        ap.error("--rates and --capacity-fractions take positive numbers (capacity: rate inf, measured first)")
    if args.smoke:
        args.capacity_fractions, args.rates, args.num_requests, args.finetune_seconds = [0.5], [], 8, 20.0
        args.output_len = min(args.output_len, 32)
        args.quiet_wait = min(args.quiet_wait, 10)
    return args


def main() -> None:
    args = parse_args()
    if not VLLM_CLI.exists():
        sys.exit("vLLM is not installed, and its `vllm bench serve` sends the load: run `bash bench/setup_vllm.sh` first")
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    RAW.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, WORK)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = dt.datetime.now()
    stamp = started.strftime("%Y-%m-%d-%H%M%S")
    training_file = WORK / "coserve-train.jsonl"
    training_file.write_bytes(training_jsonl(tokenizer, NUM_EXAMPLES))
    results: dict = {
        **result_header(started, name),
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "training_data": data_summary(training_file, tokenizer),
    }
    # A fresh data dir: no jobs, files or adapters from an earlier run; removed afterwards
    # because every job leaves its checkpoints there.
    data_dir = WORK / f"coserve-data-{stamp}"
    try:
        run_all(args, model_dir, name, training_file, data_dir, results)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    results["capacity"] = capacity(results["phases"]["inference_alone"], results["rates"])
    results["targets"] = targets(results)
    results["wall_s"] = (dt.datetime.now() - started).total_seconds()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{stamp}-coserve"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, stem.with_suffix(".png"))
    md = markdown(results, stem.with_suffix(".png").name)
    stem.with_suffix(".md").write_text(md)
    print("\n" + md + f"\nwrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
