"""Async load generator for OpenAI-compatible /v1/completions servers.

Sends `num_requests` streaming completions with Poisson arrivals at `rate` req/s
(exponential gaps from a seeded RNG, so both servers see the same schedule), each
with `ignore_eos` so every request produces exactly max_tokens tokens. Measures per
request: TTFT (send -> first chunk carrying text), TPOT ((e2e - ttft) / (tokens - 1)),
and end-to-end latency. Only ever talks to the base URL it is given (loopback).

    python bench/loadgen.py --base-url http://127.0.0.1:8000 --model NAME \
        --prompts prompts.json --rate 2 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    error: str = ""


async def _one_request(client: httpx.AsyncClient, model: str, prompt: str, output_len: int) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                if event.get("choices") and event["choices"][0].get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - start
    if ttft is None:
        return RequestResult(ok=False, error="stream carried no text")
    # usage is exact; chunk count undercounts when a chunk carries several tokens
    # (or a token decodes to no text yet), so it is only the fallback.
    return RequestResult(ok=True, ttft=ttft, e2e=e2e, output_tokens=usage_tokens or chunks)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(name: str, values: list[float]) -> dict:
    mean = sum(values) / len(values) if values else float("nan")
    return {f"{name}_mean": mean, f"{name}_p50": percentile(values, 50), f"{name}_p99": percentile(values, 99)}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft * 1000 for r in ok]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    e2es = [r.e2e * 1000 for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_output_tokens": out_tokens,
        **_stats("ttft_ms", ttfts),
        **_stats("tpot_ms", tpots),
        **_stats("e2e_ms", e2es),
    }


async def run_load(
    base_url: str,
    model: str | list[str],
    prompts: list[str],
    rate: float,
    output_len: int,
    seed: int = 0,
    request_timeout: float = 300.0,
) -> dict:
    """Send one request per prompt with Poisson arrivals at `rate`; return summary metrics.

    `model` may list one model name per prompt (LoRA adapters by popularity)."""
    models = model if isinstance(model, list) else [model] * len(prompts)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=base_url, timeout=request_timeout, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            if i:
                await asyncio.sleep(rng.expovariate(rate))
            tasks.append(asyncio.create_task(_one_request(client, models[i], prompt, output_len)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration)


async def warmup(base_url: str, model: str, prompt: str, output_len: int, n: int = 2) -> None:
    """A few sequential requests so one-time costs (compilation, caches) stay out of the numbers."""
    async with httpx.AsyncClient(base_url=base_url, timeout=300.0) as client:
        for _ in range(n):
            r = await _one_request(client, model, prompt, output_len)
            if not r.ok:
                raise RuntimeError(f"warm-up request failed: {r.error}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    ap.add_argument("--rate", type=float, required=True, help="requests per second (Poisson)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with open(args.prompts) as f:
        prompts = json.load(f)
    print(json.dumps(asyncio.run(run_load(args.base_url, args.model, prompts, args.rate, args.output_len, args.seed)), indent=2))


if __name__ == "__main__":
    main()
