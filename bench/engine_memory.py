"""Where the engine's resident memory goes under a long, varied load: leak or allocator.

One command, from the repository root:

    .venv/bin/python bench/engine_memory.py [--seconds 240] [--concurrency 64]

Drives LLMEngine directly (no server) on the default model with a closed loop of
--concurrency requests of varied shapes (prompts of 8-600 tokens, 1-128 output tokens,
greedy and sampled, top-k/top-p, seeds, logprobs, a tenth aborted midway), and every
--every-s seconds prints:

- rss: the process's resident memory (what the soak benchmark watches);
- malloc in use / free: glibc's `mallinfo2` for the heap and its arenas (bytes handed
  out and not yet returned, and bytes freed but kept by the allocator) plus its mmapped
  chunks; memory torch allocates for tensors goes through malloc too;
- python: the bytes tracemalloc sees held by Python objects (--tracemalloc only; it
  slows the run).

A leak shows as `in use` (or `python`) growing with the requests served; allocator
retention as `free` growing while `in use` stays flat. With --tracemalloc the end prints
the allocation sites that grew most since the end of the warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.messages import EngineRequest, SamplingParams  # noqa: E402
from engine.model_files import resolve_model  # noqa: E402

MIB = 1024 * 1024


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_mib() -> tuple[float, float, float]:
    """(in use, free but kept, mmapped) by glibc's malloc, in MiB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks / MIB, info.fordblks / MIB, info.hblkhd / MIB


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def random_request(index: int, rng: random.Random, vocab: int) -> EngineRequest:
    prompt = [rng.randint(100, vocab - 1) for _ in range(rng.choice((8, 32, 100, 128, 250, 600)))]
    sampled = rng.random() < 0.6
    params = SamplingParams(
        max_tokens=rng.randint(1, 128), temperature=rng.choice((0.7, 1.0)) if sampled else 0.0,
        top_p=rng.choice((1.0, 0.9)) if sampled else 1.0, top_k=rng.choice((0, 0, 40)) if sampled else 0,
        seed=rng.randint(0, 1000) if sampled and rng.random() < 0.3 else None,
        logprobs=rng.choice((None, None, None, 0, 5)), ignore_eos=rng.random() < 0.5)
    return EngineRequest(f"r{index}", prompt, params, time.time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--every-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    model_dir, _ = resolve_model(None, cache)
    engine = LLMEngine(EngineConfig(model_dir=model_dir))
    vocab = engine.model.config.vocab_size
    rng = random.Random(0)
    if args.tracemalloc:
        tracemalloc.start(8)
    running: dict[str, int] = {}  # request id -> tokens until it is aborted (or -1: never)
    sent = finished = 0
    start = last_print = time.time()
    warm_snapshot = None
    print("   s  requests   rss MiB  malloc in use / free / mmapped MiB  python MiB", flush=True)
    while time.time() - start < args.seconds:
        while len(running) < args.concurrency:
            request = random_request(sent, rng, vocab)
            running[request.request_id] = rng.randint(1, 20) if rng.random() < 0.1 else -1
            engine.add_request(request)
            sent += 1
        outputs, _ = engine.step()
        aborts = []
        for out in outputs:
            if out.finish_reason is not None:
                running.pop(out.request_id, None)
                finished += 1
            elif running.get(out.request_id, -1) > 0:
                running[out.request_id] -= 1
                if running[out.request_id] == 0:
                    aborts.append(out.request_id)
        if aborts:
            engine.abort(aborts)
            for request_id in aborts:
                running.pop(request_id, None)
        now = time.time()
        if args.tracemalloc and warm_snapshot is None and now - start >= args.warmup_s:
            warm_snapshot = tracemalloc.take_snapshot()
        if now - last_print >= args.every_s:
            last_print = now
            in_use, free, mapped = malloc_mib()
            python = tracemalloc.get_traced_memory()[0] / MIB if args.tracemalloc else float("nan")
            print(f"{now - start:4.0f} {finished:9d} {rss_mib():9.0f}  {in_use:10.0f} / {free:6.0f} / {mapped:6.0f}"
                  f"  {python:14.1f}", flush=True)
    if warm_snapshot is not None:
        print("\nallocation sites grown most since the warm-up:")
        for stat in tracemalloc.take_snapshot().compare_to(warm_snapshot, "traceback")[:12]:
            print(f"{stat.size_diff / 1024:+10.0f} KiB {stat.count_diff:+7d} blocks  {stat.traceback.format()[-1]}")
    engine.close()


if __name__ == "__main__":
    main()
