"""A live `coserve serve` process for the server tests, driven by the real openai client.

The default model is served in float32 (so greedy outputs match transformers). Set
COSERVE_CACHE_DIR to reuse the GGUF conversion across runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    url: str
    log_path: Path

    def engine_pid(self) -> int:
        """The engine child: the spawned process that is not multiprocessing's resource tracker."""
        for pid in _children(self.process.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"spawn_main" in cmdline:
                return pid
        raise AssertionError("no engine child process found")

    def stop(self) -> None:
        """SIGTERM, as an init system would; the engine child must not outlive the server."""
        if self.process.poll() is not None:
            return
        children = _children(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("server did not exit on SIGTERM")
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "orphaned engine process"


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


# Tenants of the multi-tenant tests: owner -> key. `ops` is the admin.
TENANT_KEYS = {
    "team-a": "sk-team-a-0123456789abcdef",
    "team-b": "sk-team-b-0123456789abcdef",
    "ops": "sk-ops-admin-0123456789abcdef",
}


def write_keys_file(path: Path, keys: dict[str, str] = TENANT_KEYS) -> Path:
    """A keys file (YAML) giving each owner its key; the owner `ops` is an admin."""
    entries = [
        {"key": key, "owner": owner, **({"role": "admin"} if owner == "ops" else {})} for owner, key in keys.items()
    ]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def start_server(tmp_dir: Path, *args: str, health_key: str | None = None) -> LiveServer:
    """`health_key`: the key to poll /health with, for a server that protects it."""
    port = free_port()
    env = dict(os.environ, COSERVE_DTYPE="float32", COSERVE_KV_CACHE_MEMORY_GB="0.5")
    log_path = tmp_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(tmp_dir), *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            headers = {"Authorization": f"Bearer {health_key}"} if health_key else {}
            if httpx.get(f"{server.url}/health", headers=headers, timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server did not become healthy:\n{log_path.read_text()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> LiveServer:
    live = start_server(tmp_path_factory.mktemp("coserve"))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@contextmanager
def paused_after_first_step(client: openai.OpenAI, job_id: str, timeout: float):
    """Holds a finetuning job paused once it has made its first optimizer step, for the
    body of the with-block (so per-job state can be observed however fast it trains),
    then resumes it."""
    deadline = time.monotonic() + timeout
    while not any(e.data and "step" in e.data for e in client.fine_tuning.jobs.list_events(job_id).data):
        assert time.monotonic() < deadline, "finetuning job made no step"
        time.sleep(0.1)
    client.fine_tuning.jobs.pause(job_id)
    while client.fine_tuning.jobs.retrieve(job_id).status != "paused":
        assert time.monotonic() < deadline, "finetuning job did not pause"
        time.sleep(0.1)
    yield
    client.fine_tuning.jobs.resume(job_id)
