"""Every dashboard expression, run by a real Prometheus against a live server that has
served chat completions, trained a finetuning job and served its adapter, returns data.

Prometheus scrapes the server every second from before the first request, and each
expression is evaluated over the whole traffic window (`/api/v1/query_range`, step 1s),
as a Grafana panel draws it: several series exist only while something happens (a
running job's loss, an adapter's running requests) and are gone by the time the traffic
ends, so an instant query at the end could not see them.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.deploy.dashboards import dashboard_queries, evaluable
from tests.server.conftest import free_port, paused_after_first_step, start_server

pytestmark = pytest.mark.server

SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval is at least four scrape intervals; a little more keeps a
# rate over sparse events (one request finishing) non-empty between scrapes.
RATE_INTERVAL = "10s"
# Small enough that a burst of adapter requests leaves some of them waiting.
MAX_NUM_SEQS = 4
# SLOs loose enough that requests meet them on a busy 2-core machine too (TTFTs of 30s
# were seen there), so that the goodput panel has something to show.
SLO_FLAGS = ("--ttft-slo-ms", "120000", "--tpot-slo-ms", "10000")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("deploy"),
        "--power-device", "simulated", "--power-mode", "advise", "--max-num-seqs", str(MAX_NUM_SEQS), *SLO_FLAGS,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, live, tmp_path_factory):
    """A Prometheus on 127.0.0.1 scraping the live server; yields its URL."""
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    target = live.url.removeprefix("http://")
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "scrape_configs": [{"job_name": "coserve", "static_configs": [{"targets": [target]}]}],
    }))
    port = free_port()
    log_path = work / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not become ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _api(prometheus: str, path: str, **params) -> list:
    body = httpx.get(f"{prometheus}/api/v1/{path}", params=params, timeout=30).json()
    assert body["status"] == "success", body
    return body["data"]["result"] if isinstance(body["data"], dict) else body["data"]


def _newest_scrape(prometheus: str) -> float:
    result = _api(prometheus, "query", query="max(timestamp(coserve:num_requests_running))")
    return float(result[0]["value"][1]) if result else 0.0


def _wait_for_scrapes(prometheus: str, after: float, count: int = 3) -> None:
    deadline = time.monotonic() + 60
    while _newest_scrape(prometheus) < after + count * SCRAPE_INTERVAL_S:
        assert time.monotonic() < deadline, "prometheus stopped scraping the server"
        time.sleep(SCRAPE_INTERVAL_S / 2)


def _chat(client: openai.OpenAI, model: str, stream: bool, max_tokens: int = 8) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    if stream:
        chunks = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True},
        )
        assert [chunk for chunk in chunks if chunk.usage][-1].usage.completion_tokens > 0
    else:
        assert client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens).choices


def _drive_traffic(client: openai.OpenAI, prometheus: str) -> None:
    """Chat (streamed and not) while a tiny finetuning job trains (paused for a few
    scrapes after its first step, so that the per-job series of a running job are
    seen however fast it trains), then a burst of requests to its adapter, more than
    MAX_NUM_SEQS at once, twice."""
    base = client.models.list().data[0].id
    examples = [
        {"messages": [{"role": "user", "content": "What is the password?"},
                      {"role": "assistant", "content": "The password is pineapple."}]}
    ] * 4
    training = client.files.create(
        file=("train.jsonl", io.BytesIO("\n".join(map(json.dumps, examples)).encode())), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model=base, training_file=training.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 1}}},
    )
    deadline = time.monotonic() + 240
    with paused_after_first_step(client, job.id, timeout=240):
        _wait_for_scrapes(prometheus, time.time(), count=3)
    stream = False
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"finetuning job still {job.status}"
        _chat(client, base, stream)
        stream = not stream
    assert job.status == "succeeded", job.error

    with ThreadPoolExecutor(2 * MAX_NUM_SEQS) as pool:
        for _ in range(2):
            list(pool.map(lambda _: _chat(client, job.fine_tuned_model, True, 16), range(2 * MAX_NUM_SEQS)))
            time.sleep(2 * SCRAPE_INTERVAL_S)


def test_every_dashboard_expression_returns_data(prometheus, live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
    _wait_for_scrapes(prometheus, time.time(), count=1)
    start = time.time()
    _drive_traffic(client, prometheus)
    end = time.time()
    _wait_for_scrapes(prometheus, end)

    assert client.models.list().data[0].id in _api(
        prometheus, "label/model_name/values", **{"match[]": "coserve:num_requests_running"}
    ), "the dashboards' model_name variable would list nothing"

    failures = []
    for query in dashboard_queries():
        series = _api(
            prometheus, "query_range", query=evaluable(query.expr, RATE_INTERVAL),
            start=start, end=end + 3 * SCRAPE_INTERVAL_S, step=SCRAPE_INTERVAL_S,
        )
        values = [float(value) for one in series for _, value in one["values"]]
        if not values:
            failures.append(f"{query}\n    no series")
        elif not any(math.isfinite(value) for value in values):
            failures.append(f"{query}\n    only NaN/Inf")
    assert not failures, f"{len(failures)} dashboard expressions show no data:\n" + "\n".join(failures)
