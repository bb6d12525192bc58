"""Prefix caching through the live server and the openai client: reported cached tokens,
unchanged outputs, the Prometheus counters, and `kv_ttl` pins."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.server.conftest import assert_openai_error
from tests.server.test_metrics import scrape, value

pytestmark = pytest.mark.server

BLOCK_SIZE = 16  # the server's default
SYSTEM = ("You are a meticulous assistant for a shipping company. Answer questions about parcels, "
          "delivery windows, customs forms and returns briefly and politely, and never invent tracking data.")


def unique_prompt() -> str:
    """A prompt no other test sent: its first block (and so its whole chain) is new."""
    return f"Note {uuid.uuid4().hex}. " + SYSTEM + " Summarise the rules above in one line:"


def wait_for(url: str, name: str, at_least: float, timeout: float = 10.0) -> float:
    """The counter once it reaches `at_least` (the engine reports after its iteration)."""
    deadline = time.monotonic() + timeout
    while (current := value(scrape(url), name)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return current


def test_a_repeated_prompt_is_read_from_the_cache_with_the_same_output(client, model_name, server):
    prompt = unique_prompt()
    before = scrape(server.url)
    first = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0)
    second = client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0)
    prompt_tokens = first.usage.prompt_tokens
    # A new prompt finds no whole block (its first holds a uuid): at most the leading
    # tokens of a block that another test's prompt began with ("Note ").
    found_first = first.usage.prompt_tokens_details.cached_tokens
    assert found_first < BLOCK_SIZE
    # Every prompt token but the last (computed again): the full blocks, then the tokens
    # before it in its block, which the first request either filled (with the 7 outputs
    # it computed) and registered, or left partial when it finished (a tail source too).
    expected = prompt_tokens - 1
    assert prompt_tokens > BLOCK_SIZE
    assert second.usage.prompt_tokens_details.cached_tokens == expected
    assert second.choices[0].text == first.choices[0].text
    hits_before = value(before, "coserve:prefix_cache_hits_total")
    hits = wait_for(server.url, "coserve:prefix_cache_hits_total", hits_before + found_first + expected)
    assert hits - hits_before == found_first + expected
    queries = value(scrape(server.url), "coserve:prefix_cache_queries_total")
    assert queries - value(before, "coserve:prefix_cache_queries_total") == 2 * prompt_tokens


def test_chat_turns_share_the_system_prompt_and_stream_the_cached_count(client, model_name):
    system = {"role": "system", "content": f"Session {uuid.uuid4().hex}. {SYSTEM}"}
    first = client.chat.completions.create(
        model=model_name, messages=[system, {"role": "user", "content": "Where is my parcel?"}], max_tokens=4,
        temperature=0,
    )
    # A new session finds no whole block: at most the chat template's opening tokens
    # ("<|im_start|>system\nSession "), as the leading tokens of a block earlier chats began with.
    assert first.usage.prompt_tokens_details.cached_tokens < BLOCK_SIZE
    history = [system, {"role": "user", "content": "Where is my parcel?"},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And can I return it?"}]
    chunks = list(client.chat.completions.create(
        model=model_name, messages=history, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    usage = chunks[-1].usage
    # The first turn's prompt starts the second's, so all its full blocks are found.
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE > 0
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


@pytest.mark.parametrize("bad", [0, -1, "soon", 601, float("1e300")])
def test_bad_kv_ttl_is_rejected(http, model_name, bad):
    response = http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 1, "kv_ttl": bad})
    assert_openai_error(response, 400, param="kv_ttl")


def test_kv_ttl_pins_the_kv_until_it_expires(client, model_name, server):
    before = scrape(server.url)
    pins, expiries = value(before, "coserve:kv_pins_total"), value(before, "coserve:kv_pin_expiries_total")
    prompt = unique_prompt()
    client.completions.create(model=model_name, prompt=prompt, max_tokens=4, temperature=0, extra_body={"kv_ttl": 2})
    assert wait_for(server.url, "coserve:kv_pins_total", pins + 1) == pins + 1
    assert value(scrape(server.url), "coserve:kv_pinned_blocks") > 0
    time.sleep(2.5)
    # Pins expire when the engine next schedules; the follow-up still finds the blocks
    # (expired pins leave them cached until evicted).
    follow_up = client.completions.create(model=model_name, prompt=prompt + " Again:", max_tokens=2, temperature=0)
    assert follow_up.usage.prompt_tokens_details.cached_tokens > 0
    assert wait_for(server.url, "coserve:kv_pin_expiries_total", expiries + 1) == expiries + 1
