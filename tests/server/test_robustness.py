"""Overload, disconnects and engine death, on a small server of their own
(max_num_seqs 1, max_queued_requests 1, 2048-token context), killed at the end."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import assert_openai_error, start_server

pytestmark = pytest.mark.server

LONG = {"prompt": "Count: 1 2 3", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    live = start_server(
        tmp_path_factory.mktemp("small"), "--max-num-seqs", "1", "--max-queued-requests", "1", "--max-model-len", "2048"
    )
    yield live
    live.stop()
    assert live.process.returncode is not None


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"coserve:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(name)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_max_tokens_none_fills_the_context(small):
    with httpx.Client(base_url=small.url, timeout=60) as http:
        prompt = [28] * 2036
        out = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": None, "ignore_eos": True}).json()
        assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["finish_reason"] == "length"


def test_queue_full_429_then_disconnect_frees(small):
    with httpx.Client(base_url=small.url, timeout=60) as http:
        streams = []
        # One running, one queued: capacity reached.
        for _ in range(2):
            ctx = http.stream("POST", "/v1/completions", json={**LONG, "stream": True})
            response = ctx.__enter__()
            assert response.status_code == 200
            streams.append((ctx, response))
        wait_until(lambda: metric(http, "num_requests_running") == 1)
        r = http.post("/v1/completions", json=LONG)
        assert_openai_error(r, 429, code="queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        # Hanging up aborts both in the engine.
        for ctx, response in streams:
            response.close()
            ctx.__exit__(None, None, None)
        # The server notices the hang-ups asynchronously; then the engine holds nothing.
        wait_until(lambda: metric(http, "num_requests_running") == 0)
        wait_until(lambda: metric(http, "num_requests_waiting") == 0)
        assert metric(http, "kv_cache_usage_perc") == 0.0
        assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_non_streaming_disconnect_aborts(small):
    with httpx.Client(base_url=small.url, timeout=60) as http:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{small.url}/v1/completions", json=LONG, timeout=1.5)
        # The abandoned request (2000 tokens, a minute or more here) no longer holds the only slot.
        started = time.monotonic()
        out = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True}).json()
        assert out["usage"]["completion_tokens"] == 2
        assert time.monotonic() - started < 20


def test_engine_death_fails_requests_and_health(small):
    import os

    results: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: results.append(httpx.post(f"{small.url}/v1/completions", json=LONG, timeout=60))
    )
    thread.start()
    with httpx.Client(base_url=small.url, timeout=10) as http:
        wait_until(lambda: metric(http, "num_requests_running") == 1)
        os.kill(small.engine_pid(), signal.SIGKILL)
        thread.join(5)
        assert not thread.is_alive(), "in-flight request hung after engine death"
        assert_openai_error(results[0], 503)
        wait_until(lambda: http.get("/health").status_code == 503, timeout=3)
        assert_openai_error(http.get("/health"), 503)
        assert_openai_error(http.post("/v1/completions", json={"prompt": "x"}), 503)
    # Then the daemon exits, with a failure status, for its supervisor to restart it.
    small.process.wait(30)
    assert small.process.returncode == 1
    assert "the engine died" in small.log_path.read_text()


def _stream_events(url: str, body: dict, events: list) -> None:
    """Reads a completion stream, appending each SSE payload as it arrives."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        events.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])


# Long enough for a 4-token request to finish on a busy 2-core machine; far too short for LONG.
DRAIN_S = 10


def test_sigterm_drains_then_ends_what_is_left(tmp_path):
    """SIGTERM: no new connections; a request that can finish within drain_timeout_s
    finishes; one that cannot ends with an error event; the daemon exits promptly."""
    live = start_server(tmp_path, "--drain-timeout-s", str(DRAIN_S))
    short, long = [], []
    threads = [
        threading.Thread(target=_stream_events, args=(live.url, {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True},
                                                      short)),
        threading.Thread(target=_stream_events, args=(live.url, LONG, long)),
    ]
    try:
        threads[1].start()
        wait_until(lambda: len(long) > 2)  # the long one is streaming
        threads[0].start()
        wait_until(lambda: len(short) > 1)
        started = time.monotonic()
        live.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{live.url}/health", timeout=2)
        for thread in threads:
            thread.join(30)
        live.process.wait(30)
        exit_s = time.monotonic() - started
    finally:
        live.stop()
    assert short[0] == 200 and short[-1] == "[DONE]"
    finished = json.loads(short[-2])
    assert "choices" in finished, finished
    assert finished["choices"][0]["finish_reason"] == "length"
    assert long[0] == 200 and long[-1] == "[DONE]"
    error = json.loads(long[-2])["error"]
    assert error["code"] == "server_shutting_down" and f"drain_timeout_s={DRAIN_S}" in error["message"]
    assert len(long) < 2000  # ended early, not finished
    assert DRAIN_S <= exit_s < DRAIN_S + 20, exit_s
