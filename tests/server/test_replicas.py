"""Two coserve replicas on loopback behind vllm-router (consistent_hash on `x-user-id`),
driven with the openai client through the router: an adapter loaded through the router
lands on the replica the caller's key maps to, and that caller's requests for it reach
it; an adapter keyed by its own name (`x-session-id`) is reached by every tenant; a
caller's file (uploaded as JSON: the router forwards JSON bodies only), job and
fine-tuned model stay on its replica; when a replica is killed the router routes around
it. The test starts and stops every process itself.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.peft_adapters import write_peft_adapter
from tests.server.conftest import LiveServer, free_port, start_server
from tests.server.test_metrics import scrape

pytestmark = pytest.mark.server

ROUTER_START_TIMEOUT_S = 60
# The router checks each replica's /health every second and drops it after one failure.
HEALTH_INTERVAL_S = 1
TRAINING = "\n".join(
    json.dumps({"messages": [{"role": "user", "content": f"Code {i}?"},
                             {"role": "assistant", "content": f"The code is {i}."}]})
    for i in range(4)
).encode()


@dataclass
class Router:
    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        """The router runs in its own process group: end the whole group."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def healthy_workers(self) -> set[str]:
        workers = httpx.get(f"{self.url}/workers", timeout=10).json()["workers"]
        return {w["url"] for w in workers if w["is_healthy"]}


def start_router(log_path: Path, worker_urls: list[str]) -> Router:
    # Installed with the test extra, next to this interpreter (PATH may not name the venv).
    binary = Path(sysconfig.get_path("scripts")) / "vllm-router"
    assert binary.exists(), "vllm-router is in the test extra: pip install -e '.[test]'"
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(binary), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls,
             "--policy", "consistent_hash", "--prometheus-port", str(free_port()),
             "--health-check-interval-secs", str(HEALTH_INTERVAL_S), "--health-failure-threshold", "1",
             "--health-check-timeout-secs", "5", "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    router = Router(process, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + ROUTER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm-router exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if router.healthy_workers() == set(worker_urls):
                return router
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    router.stop()
    raise RuntimeError(f"vllm-router did not come up:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory) -> Path:
    from engine.model_files import resolve_model

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    root = tmp_path_factory.mktemp("replica-adapters")
    for seed, name in enumerate(("solo", "shared")):
        write_peft_adapter(resolve_model(None, cache)[0], root / name, seed=3 + seed, b_scale=0.3, r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, adapter_root):
    replicas: list[LiveServer] = []
    router = None
    try:
        for name in ("a", "b"):
            data_dir = tmp_path_factory.mktemp(f"replica-{name}")
            replicas.append(start_server(data_dir, "--lora-roots", str(adapter_root), "--num-threads", "1"))
        router = start_router(tmp_path_factory.mktemp("router") / "router.log", [r.url for r in replicas])
        yield router, replicas
    finally:
        if router is not None:
            router.stop()
        for replica in replicas:
            replica.stop()


def through_router(router: Router, user: str) -> openai.OpenAI:
    """A tenant's client: its `x-user-id` is the key the router hashes to pick a replica."""
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=300,
                         default_headers={"x-user-id": user})


def direct(replica: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{replica.url}/v1", api_key="unused", max_retries=0, timeout=300)


def holders(replicas: list[LiveServer], model: str) -> list[LiveServer]:
    return [r for r in replicas if model in {m.id for m in direct(r).models.list().data}]


@pytest.fixture(scope="module")
def owner_replica(cluster, adapter_root) -> LiveServer:
    """team-a loads an adapter through the router: it lands on team-a's replica, only there."""
    router, replicas = cluster
    loaded = httpx.post(f"{router.url}/v1/load_lora_adapter", headers={"x-user-id": "team-a"}, timeout=120,
                        json={"lora_name": "solo", "lora_path": str(adapter_root / "solo")})
    assert loaded.status_code == 200, loaded.text
    (holder,) = holders(replicas, "solo")
    return holder


def test_an_adapter_on_one_replica_is_reached_through_the_router(cluster, owner_replica):
    router, replicas = cluster
    client = through_router(router, "team-a")
    for _ in range(4):
        reply = client.completions.create(model="solo", prompt="Hello", max_tokens=3, extra_body={"ignore_eos": True})
        assert reply.model == "solo" and reply.usage.completion_tokens == 3
    reply = client.chat.completions.create(model="solo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.model == "solo" and reply.usage.completion_tokens >= 1
    # The other replica does not hold it: the key decides, so another key may land there.
    (other,) = [r for r in replicas if r is not owner_replica]
    with pytest.raises(openai.NotFoundError):
        direct(other).completions.create(model="solo", prompt="Hello", max_tokens=1)


def test_an_adapter_keyed_by_its_name_is_reached_by_every_tenant(cluster, adapter_root):
    """`x-session-id` comes before `x-user-id` in the router's key: an adapter loaded with
    its own name as the session key lands on the replica that name hashes to, and every
    tenant's requests that carry the same key reach it, wherever their own keys hash."""
    router, replicas = cluster
    loaded = httpx.post(f"{router.url}/v1/load_lora_adapter", timeout=120,
                        headers={"x-user-id": "team-a", "x-session-id": "adapter-shared"},
                        json={"lora_name": "shared", "lora_path": str(adapter_root / "shared")})
    assert loaded.status_code == 200, loaded.text
    (holder,) = holders(replicas, "shared")
    tenants = [f"tenant-{i}" for i in range(8)]
    served_before = finished_requests(holder)
    for tenant in tenants:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=300,
                               default_headers={"x-user-id": tenant, "x-session-id": "adapter-shared"})
        reply = client.completions.create(model="shared", prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True})
        assert reply.model == "shared" and reply.usage.completion_tokens == 2
    assert finished_requests(holder) - served_before == len(tenants)
    # Without the adapter's key the tenants' own keys decide, and some land where it is not.
    missed = 0
    for tenant in tenants:
        try:
            through_router(router, tenant).completions.create(model="shared", prompt="Hi", max_tokens=1)
        except openai.NotFoundError:
            missed += 1
    assert 0 < missed < len(tenants)


def test_files_jobs_and_fine_tuned_models_stay_on_their_owners_replica(cluster, owner_replica):
    router, replicas = cluster
    client = through_router(router, "team-a")
    # vllm-router 0.1.17 forwards JSON bodies only: a multipart upload stops at the router,
    # the JSON form of the upload passes.
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("train.jsonl", io.BytesIO(TRAINING)), purpose="fine-tune")
    upload = client.post("/files", cast_to=openai.types.FileObject,
                         body={"purpose": "fine-tune", "filename": "train.jsonl", "content": TRAINING.decode()})
    assert direct(owner_replica).files.retrieve(upload.id).bytes == len(TRAINING)
    (other,) = [r for r in replicas if r is not owner_replica]
    with pytest.raises(openai.NotFoundError):
        direct(other).files.retrieve(upload.id)
    assert client.files.retrieve(upload.id).bytes == len(TRAINING)
    assert client.files.content(upload.id).content == TRAINING
    job = client.fine_tuning.jobs.create(
        model=client.models.list().data[0].id, training_file=upload.id,
        hyperparameters={"n_epochs": 1, "batch_size": 2}, extra_body={"lora": {"rank": 4, "alpha": 8}},
    )
    deadline = time.monotonic() + 600
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1)
    assert job.status == "succeeded", job.error
    steps = {e.data["step"] for e in client.fine_tuning.jobs.list_events(job.id).data if e.data and "step" in e.data}
    assert steps == {1, 2}  # 4 examples, batch size 2, one epoch
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                           messages=[{"role": "user", "content": "Code 1?"}])
    assert reply.model == job.fine_tuned_model
    with pytest.raises(openai.NotFoundError):
        direct(other).fine_tuning.jobs.retrieve(job.id)
    assert holders(replicas, job.fine_tuned_model) == [owner_replica]


def finished_requests(replica: LiveServer) -> float:
    return sum(scrape(replica.url).get("coserve:request_success_total", {}).values())


def test_a_killed_replica_is_routed_around(cluster, owner_replica):
    router, replicas = cluster
    (victim,) = [r for r in replicas if r is not owner_replica]
    model = direct(owner_replica).models.list().data[0].id
    users = [f"user-{i}" for i in range(16)]

    def complete(user: str) -> None:
        reply = through_router(router, user).completions.create(model=model, prompt="Hi", max_tokens=2,
                                                                 extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 2

    # Which keys the router sends to the replica about to die (the victim counts them).
    victims_users = []
    for user in users:
        before = finished_requests(victim)
        complete(user)
        if finished_requests(victim) > before:
            victims_users.append(user)
    assert 0 < len(victims_users) < len(users)  # 16 keys over two replicas: both get some

    engine = victim.engine_pid()
    victim.process.kill()
    victim.process.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{engine}").exists():  # the engine child follows its server (PDEATHSIG)
        assert time.monotonic() < deadline, "the killed replica's engine outlived it"
        time.sleep(0.2)
    deadline = time.monotonic() + 30 * HEALTH_INTERVAL_S
    while router.healthy_workers() != {owner_replica.url}:
        assert time.monotonic() < deadline, "the router kept the dead replica"
        time.sleep(0.2)
    served_before = finished_requests(owner_replica)
    for user in victims_users:
        complete(user)
    assert finished_requests(owner_replica) == served_before + len(victims_users)
