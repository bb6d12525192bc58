"""Power what-if benchmark (SIMULATED): the frequency governor against the top clock.

One command, from the repository root:

    .venv/bin/python bench/bench_power.py      # 3 seeds x 10 simulated minutes, ~1 min

Nothing runs on a GPU and no model is loaded: everything here is simulated. For each
seed, bench/power_what_if.py generates a bursty, Azure-conversation-like request
trace (its comments say what it is shaped after and what is assumed) and serves it
on `SimulatedGpu` (an H100 SXM serving a Llama-3-8B-like model; its constants and
their sources are in engine/power/simulated_device.py) by a continuous-batching loop,
twice: governed (FrequencyGovernor in mode apply, with a cold latency model that
learns online) and at the top clock. It reports, per seed and pooled: requests, SLO
attainment (TTFT, TPOT, both) of both runs, energy of both over the same span (the
run that ends first idles until the other ends), the energy saved, the governed
run's mean SM clock over its busy time and its busy time per clock band. Target:
>= 25% less energy with >= 99% of requests inside both SLOs.

Writes bench/results/<date>-<time>-power-whatif.json and .md.
Options: --seeds 1,2,3, --duration-s 600, --rate 4 (mean req/s), --ttft-slo-ms 600,
--tpot-slo-ms 30, --max-batched-tokens 1024, --max-seqs 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_serving import BENCH, result_header  # noqa: E402
from bench.power_what_if import (  # noqa: E402
    ServingSetup,
    TraceShape,
    WhatIf,
    azure_like_trace,
    governed_against_top_clock,
)
from engine.power.simulated_device import SimulatedGpuConfig  # noqa: E402

MODEL = "SIMULATED: Llama-3-8B-like model on a simulated H100 SXM (SimulatedGpu)"
TARGET_SAVING = 0.25
TARGET_ATTAINMENT = 0.99
# Lower edges of the clock bands the governed run's busy time is split into (MHz).
BAND_EDGES = (210, 600, 1000, 1400, 1800)


def band_label(index: int) -> str:
    top = SimulatedGpuConfig().max_clock_mhz
    if index + 1 < len(BAND_EDGES):
        return f"{BAND_EDGES[index]}-{BAND_EDGES[index + 1]}"
    return f"{BAND_EDGES[index]}-{top}"


def summarize(seed: int, what_if: WhatIf, setup: ServingSetup, wall_s: float) -> dict:
    governed, top = what_if.governed, what_if.top_clock
    busy = governed.busy_s_by_clock
    busy_total = sum(busy.values())
    bands = [0.0] * len(BAND_EDGES)
    for mhz, seconds in busy.items():
        bands[int(np.searchsorted(BAND_EDGES, mhz, side="right")) - 1] += seconds
    prompts = [r.prompt for r in governed.requests]
    outputs = [r.output for r in governed.requests]
    return {
        "seed": seed,
        "requests": len(governed.requests),
        "prompt_tokens": {
            "mean": float(np.mean(prompts)),
            "p50": float(np.median(prompts)),
        },
        "output_tokens": {
            "mean": float(np.mean(outputs)),
            "p50": float(np.median(outputs)),
        },
        "span_s": governed.gpu.elapsed_s,
        "governed": {
            "attainment": governed.attainment(setup),
            "energy_j": governed.gpu.total_energy_joules(),
            "busy_s": busy_total,
            "mean_busy_clock_mhz": sum(m * s for m, s in busy.items()) / busy_total,
            "busy_share_by_band": {
                band_label(i): seconds / busy_total for i, seconds in enumerate(bands)
            },
        },
        "top_clock": {
            "attainment": top.attainment(setup),
            "energy_j": top.gpu.total_energy_joules(),
            "busy_s": sum(top.busy_s_by_clock.values()),
        },
        "energy_saved": what_if.energy_saved(),
        "wall_s": wall_s,
    }


def pooled(runs: list[dict]) -> dict:
    """All seeds together: attainment over all requests, energy summed."""
    n = sum(r["requests"] for r in runs)

    def attainment(side: str) -> dict:
        return {
            k: sum(r[side]["attainment"][k] * r["requests"] for r in runs) / n
            for k in ("ttft", "tpot", "both")
        }

    governed = sum(r["governed"]["energy_j"] for r in runs)
    top = sum(r["top_clock"]["energy_j"] for r in runs)
    busy = sum(r["governed"]["busy_s"] for r in runs)
    mean_clock = (
        sum(
            r["governed"]["mean_busy_clock_mhz"] * r["governed"]["busy_s"] for r in runs
        )
        / busy
    )
    return {
        "requests": n,
        "governed": {
            "attainment": attainment("governed"),
            "energy_j": governed,
            "mean_busy_clock_mhz": mean_clock,
        },
        "top_clock": {"attainment": attainment("top_clock"), "energy_j": top},
        "energy_saved": 1 - governed / top,
    }


def targets_met(entry: dict) -> bool:
    return (
        entry["energy_saved"] >= TARGET_SAVING
        and entry["governed"]["attainment"]["both"] >= TARGET_ATTAINMENT
    )


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def table(results: dict) -> list[str]:
    lines = [
        (
            "| seed | requests | governed TTFT % | TPOT % | both % | top clock TTFT % "
            "| TPOT % | both % | governed J | top clock J | energy saved % "
            "| mean clock MHz | targets |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [(str(r["seed"]), r) for r in results["runs"]] + [("all", results["pooled"])]
    for label, r in rows:
        g, t = r["governed"], r["top_clock"]
        cells = [
            label,
            str(r["requests"]),
            *(pct(g["attainment"][k]) for k in ("ttft", "tpot", "both")),
            *(pct(t["attainment"][k]) for k in ("ttft", "tpot", "both")),
            f"{g['energy_j']:.0f}",
            f"{t['energy_j']:.0f}",
            f"{100 * r['energy_saved']:.1f}",
            f"{g['mean_busy_clock_mhz']:.0f}",
            "met" if targets_met(r) else "**not met**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def band_table(results: dict) -> list[str]:
    labels = [band_label(i) for i in range(len(BAND_EDGES))]
    lines = [
        "| seed | " + " | ".join(f"{b} MHz %" for b in labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for r in results["runs"]:
        shares = r["governed"]["busy_share_by_band"]
        lines.append(
            f"| {r['seed']} | " + " | ".join(pct(shares[b]) for b in labels) + " |"
        )
    return lines


def markdown(results: dict) -> str:
    m, s, shape = results["machine"], results["setup"], results["trace"]
    pooled_entry = results["pooled"]
    verdict = "met" if targets_met(pooled_entry) else "**not met**"
    return "\n".join(
        [
            f"# Power what-if (SIMULATED), {results['date']}",
            "",
            (
                "**Every number here is simulated**: no GPU ran. The request trace is "
                "generated (Azure-conversation-like, bursty: bench/power_what_if.py) and "
                "served on `SimulatedGpu`, a model of an H100 SXM serving a "
                "Llama-3-8B-like model (engine/power/simulated_device.py), governed "
                "(mode apply, cold latency model learning online) and at the top clock."
            ),
            "",
            (
                f"Simulator host: {m['cpu_model']}, {m['cores']} cores; coserve "
                f"{m['coserve_commit']}. Wall time {results['wall_s']:.0f} s."
            ),
            "",
            (
                f"Trace: {results['duration_s']:g} simulated s per seed, "
                f"{shape['mean_rate']:g} req/s on average (the Azure conversation "
                "trace's own mean is 5.5 req/s, for a fleet; bench/power_what_if.py "
                "says why one simulated GPU gets less by default), bursts at "
                f"{shape['burst_factor']:g}x the calm rate for "
                f"{100 * shape['burst_share']:g}% of the time (mean "
                f"{shape['mean_burst_s']:g} s). SLOs: TTFT {s['ttft_slo_ms']:g} ms, TPOT "
                f"{s['tpot_slo_ms']:g} ms; token budget {s['max_batched_tokens']} per "
                f"iteration, at most {s['max_seqs']} sequences."
            ),
            "",
            f"Command: `{results['command']}`",
            "",
            *table(results),
            "",
            (
                "TTFT / TPOT / both: share of requests inside that SLO (both: inside both). "
                "Energy: joules over the same span for both runs (the run that ends first "
                "idles, at idle power, until the other ends). Mean clock: the governed "
                "run's SM clock averaged over its busy time. Targets: >= "
                f"{100 * TARGET_SAVING:g}% less energy with >= {100 * TARGET_ATTAINMENT:g}% "
                "of requests inside both SLOs."
            ),
            "",
            "Governed run's busy time by SM clock band:",
            "",
            *band_table(results),
            "",
            (
                f"Pooled over all seeds: {pct(pooled_entry['governed']['attainment']['both'])}% "
                f"of requests inside both SLOs (top clock "
                f"{pct(pooled_entry['top_clock']['attainment']['both'])}%), "
                f"{100 * pooled_entry['energy_saved']:.1f}% less energy: target {verdict}."
            ),
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=TraceShape().mean_rate)
    ap.add_argument("--ttft-slo-ms", type=float, default=ServingSetup().ttft_slo_ms)
    ap.add_argument("--tpot-slo-ms", type=float, default=ServingSetup().tpot_slo_ms)
    ap.add_argument(
        "--max-batched-tokens", type=int, default=ServingSetup().max_batched_tokens
    )
    ap.add_argument("--max-seqs", type=int, default=ServingSetup().max_seqs)
    args = ap.parse_args()

    started = dt.datetime.now()
    setup = ServingSetup(
        args.ttft_slo_ms, args.tpot_slo_ms, args.max_batched_tokens, args.max_seqs
    )
    shape = TraceShape(mean_rate=args.rate)
    results: dict = {
        **result_header(started, MODEL),
        "simulated": True,
        "duration_s": args.duration_s,
        "setup": dataclasses.asdict(setup),
        "trace": {k: v for k, v in dataclasses.asdict(shape).items() if k != "kinds"},
        "trace_kinds": [dataclasses.asdict(k) for k in shape.kinds],
        "runs": [],
    }
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        what_if = governed_against_top_clock(
            azure_like_trace(seed, args.duration_s, shape), setup
        )
        run = summarize(seed, what_if, setup, time.perf_counter() - t0)
        results["runs"].append(run)
        print(
            f"[power-whatif SIMULATED] seed {seed}: {run['requests']} requests, "
            f"both SLOs {pct(run['governed']['attainment']['both'])}% governed / "
            f"{pct(run['top_clock']['attainment']['both'])}% top clock, energy saved "
            f"{100 * run['energy_saved']:.1f}%, mean clock "
            f"{run['governed']['mean_busy_clock_mhz']:.0f} MHz ({run['wall_s']:.0f} s)",
            flush=True,
        )
    results["pooled"] = pooled(results["runs"])
    results["wall_s"] = (dt.datetime.now() - started).total_seconds()

    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    stem = out / (started.strftime("%Y-%m-%d-%H%M%S") + "-power-whatif")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
