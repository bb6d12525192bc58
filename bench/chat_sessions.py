"""Closed-loop multi-turn chat sessions through the `openai` SDK, as a chat app runs them.

Each conversation sends its turns one after another to /v1/chat/completions (streamed):
turn k's messages are the system prompt, every earlier user message with the reply the
server streamed back for it, and the k-th user message. So the history a turn resends
ends with the model's own reply, which a prefix cache may still hold (vLLM's load
generator sends fixed datasets and cannot do this). `concurrency` conversations run at
once, each taking the next conversation when it finishes one.

Per request: TTFT (sent -> first chunk with content), TPOT ((end - TTFT) / (completion
tokens - 1)), end-to-end latency, and the token counts the server reports in the
stream's usage chunk. Returns the summary keys vLLM's `bench serve` results use
(p50_ttft_ms, ..., output_throughput, completed, failed), TTFT p50 per turn, and the mean
prompt and completion tokens per turn, so that runs on different servers can be read
side by side. Talks only to the base URL it is given.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import openai

from bench.loadgen import percentile


@dataclass
class Conversation:
    system: str
    user_messages: list[str]


@dataclass
class TurnResult:
    turn: int  # 1-based
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


async def _turn(client: openai.AsyncOpenAI, model: str, messages: list[dict], turn: int, max_tokens: int,
                temperature: float) -> tuple[TurnResult, str]:
    """One streamed chat completion; returns its measurements and the reply's text."""
    started = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    parts.append(choice.delta.content)
    except openai.OpenAIError as e:
        return TurnResult(turn, False, error=f"{type(e).__name__}: {e}"), ""
    latency = time.perf_counter() - started
    if ttft is None or usage is None:
        return TurnResult(turn, False, error="no content" if ttft is None else "no usage chunk"), ""
    return TurnResult(turn, True, ttft, latency, usage.prompt_tokens, usage.completion_tokens), "".join(parts)


async def _conversation(client: openai.AsyncOpenAI, model: str, conv: Conversation, max_tokens: int,
                        temperature: float) -> list[TurnResult]:
    messages = [{"role": "system", "content": conv.system}]
    results = []
    for turn, user in enumerate(conv.user_messages, 1):
        messages.append({"role": "user", "content": user})
        result, reply = await _turn(client, model, messages, turn, max_tokens, temperature)
        results.append(result)
        if not result.ok:
            # The later turns have no history to send: failed too, so that the count of
            # failures is the count of turns the conversation did not get answered.
            results += [TurnResult(later, False, error="not sent: an earlier turn failed")
                        for later in range(turn + 1, len(conv.user_messages) + 1)]
            break
        messages.append({"role": "assistant", "content": reply})
    return results


async def run_sessions(base_url: str, model: str, conversations: list[Conversation], max_tokens: int,
                       temperature: float, concurrency: int) -> dict:
    queue = list(reversed(conversations))
    results: list[TurnResult] = []

    async def worker(client: openai.AsyncOpenAI) -> None:
        while queue:
            results.extend(await _conversation(client, model, queue.pop(), max_tokens, temperature))

    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0,
                                  timeout=600.0) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        duration = time.perf_counter() - started
    return summarize(results, duration)


def _percentile_ms(values: list[float], q: float) -> float | None:
    """None where nothing completed (the report prints n/a)."""
    return percentile(values, q) * 1000 if values else None


def summarize(results: list[TurnResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok]
    tpots = [(r.latency_s - r.ttft_s) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    by_turn: dict[int, list[TurnResult]] = {}
    for r in ok:
        by_turn.setdefault(r.turn, []).append(r)
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": sum(r.completion_tokens for r in ok) / duration_s,
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": sum(r.completion_tokens for r in ok),
        **{f"p{q}_ttft_ms": _percentile_ms(ttfts, q) for q in (50, 99)},
        **{f"p{q}_tpot_ms": _percentile_ms(tpots, q) for q in (50, 99)},
        "ttft_p50_ms_by_turn": {str(t): statistics.median(r.ttft_s for r in rs) * 1000
                                for t, rs in sorted(by_turn.items())},
        "prompt_tokens_by_turn": {str(t): statistics.mean(r.prompt_tokens for r in rs)
                                  for t, rs in sorted(by_turn.items())},
        "completion_tokens_by_turn": {str(t): statistics.mean(r.completion_tokens for r in rs)
                                      for t, rs in sorted(by_turn.items())},
        **({"error_samples": errors[:3]} if errors else {}),
    }
