"""The Files API: the openai client against a live server with its own data directory
(restarted once to prove durability), plus the store and the upload limits in-process."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from server.api_keys import KeyRing
from server.auth import authenticate
from server.errors import install_error_handlers
from server.routes import files as files_route
from server.store import FileNotFound, Store, StoreError
from server.store.db import MIGRATIONS
from server.store.files import TEMP_PREFIX
from tests.server.conftest import TENANT_KEYS, LiveServer, assert_openai_error, start_server, write_keys_file

pytestmark = pytest.mark.server

FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details", "expires_at"}
JSONL = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


class FilesServer:
    """One live server per module; the restart test replaces `live` with a new process on the same data directory."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.live: LiveServer = start_server(data_dir)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.live.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.live.url, timeout=60)


@pytest.fixture(scope="module")
def files_server(tmp_path_factory) -> FilesServer:
    server = FilesServer(tmp_path_factory.mktemp("files-data"))
    yield server
    server.live.stop()


@pytest.fixture
def client(files_server) -> openai.OpenAI:
    return files_server.client()


@pytest.fixture
def http(files_server) -> httpx.Client:
    with files_server.http() as c:
        yield c


def upload(http: httpx.Client, data: bytes, purpose: str = "fine-tune") -> httpx.Response:
    return http.post("/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": purpose})


def test_upload_from_memory_and_from_files(client, http, tmp_path):
    before = int(time.time())
    memory = client.files.create(file=("train.jsonl", JSONL), purpose="fine-tune")
    assert memory.id.startswith("file-") and memory.object == "file" and memory.bytes == len(JSONL)
    assert memory.filename == "train.jsonl" and memory.purpose == "fine-tune" and memory.status == "processed"
    assert before <= memory.created_at <= time.time()
    raw = http.get(f"/v1/files/{memory.id}").json()
    assert set(raw) == FILE_KEYS and raw["status_details"] is None and raw["expires_at"] is None
    assert client.files.retrieve(memory.id) == memory

    path = tmp_path / "from-disk.jsonl"
    path.write_bytes(JSONL * 3)
    from_path = client.files.create(file=path, purpose="fine-tune")
    with open(path, "rb") as handle:
        from_handle = client.files.create(file=handle, purpose="fine-tune")
    for made in (from_path, from_handle):
        assert made.filename == "from-disk.jsonl" and made.bytes == len(JSONL) * 3
        assert client.files.content(made.id).content == JSONL * 3
    assert len({memory.id, from_path.id, from_handle.id}) == 3


def test_contents_round_trip_byte_for_byte(client, http):
    # Multipart delimiters, bare CR/LF and every byte value, in a body spanning many network chunks.
    tricky = b"\r\n--boundary\r\n--\r\n\r\r\n\n" + bytes(range(256))
    payload = (tricky + os.urandom(3 * 1024 * 1024)) * 2
    made = client.files.create(file=("blob.bin", payload), purpose="fine-tune")
    assert made.bytes == len(payload)
    assert client.files.content(made.id).content == payload
    response = http.get(f"/v1/files/{made.id}/content")
    assert response.headers["content-length"] == str(len(payload)) and response.content == payload
    empty = client.files.create(file=("empty.jsonl", b""), purpose="fine-tune")
    assert empty.bytes == 0 and client.files.content(empty.id).content == b""


def test_list_pagination(client, http):
    for _ in range(5):
        client.files.create(file=("page.jsonl", JSONL), purpose="fine-tune")
    everything = http.get("/v1/files", params={"order": "asc"}).json()
    ids = [f["id"] for f in everything["data"]]
    assert len(ids) >= 5 and everything["has_more"] is False and everything["object"] == "list"
    assert (everything["first_id"], everything["last_id"]) == (ids[0], ids[-1])
    created = [f["created_at"] for f in everything["data"]]
    assert created == sorted(created)

    pages, after = [], None
    while True:
        page = http.get("/v1/files", params={"order": "asc", "limit": 2, **({"after": after} if after else {})}).json()
        pages.append([f["id"] for f in page["data"]])
        assert page["first_id"] == pages[-1][0] and page["last_id"] == pages[-1][-1]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [i for p in pages for i in p] == ids and all(len(p) == 2 for p in pages[:-1])

    assert [f.id for f in client.files.list(order="desc")] == ids[::-1]
    # The client follows `after` across pages by itself.
    assert [f.id for f in client.files.list(limit=2, order="asc")] == ids
    assert [f.id for f in client.files.list(purpose="fine-tune")] == ids[::-1]
    other = http.get("/v1/files", params={"purpose": "batch"}).json()
    assert other == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_delete_then_404(client, http):
    made = client.files.create(file=("gone.jsonl", JSONL), purpose="fine-tune")
    assert http.delete(f"/v1/files/{made.id}").json() == {"id": made.id, "object": "file", "deleted": True}
    for response in (
        http.get(f"/v1/files/{made.id}"),
        http.get(f"/v1/files/{made.id}/content"),
        http.delete(f"/v1/files/{made.id}"),
    ):
        assert_openai_error(response, 404, param="file_id", code="file_not_found")
    assert made.id not in [f.id for f in client.files.list()]


def test_unknown_id_404_in_openai_shape(client, http):
    error = assert_openai_error(http.get("/v1/files/file-nope"), 404, param="file_id", code="file_not_found")
    assert error["type"] == "invalid_request_error" and "file-nope" in error["message"]
    with pytest.raises(openai.NotFoundError) as raised:
        client.files.retrieve("file-nope")
    assert raised.value.code == "file_not_found"
    assert_openai_error(http.get("/v1/files", params={"after": "file-nope"}), 404, param="after")


def test_bad_uploads_400(client, http):
    assert_openai_error(upload(http, JSONL, purpose="batch"), 400, param="purpose")
    assert_openai_error(upload(http, JSONL, purpose="x" * 100_000), 400, param="purpose")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", JSONL), purpose="assistants")
    assert_openai_error(http.post("/v1/files", data={"purpose": "fine-tune"}, files={"other": b"x"}), 400, param="other")
    only_purpose = {"purpose": (None, "fine-tune")}  # multipart, without a file part
    assert_openai_error(http.post("/v1/files", files=only_purpose), 400, param="file")
    extra = http.post("/v1/files", data={"purpose": "fine-tune", "note": "x"}, files={"file": ("x.jsonl", JSONL)})
    assert_openai_error(extra, 400, param="note")
    assert_openai_error(http.post("/v1/files", files={"file": ("x.jsonl", JSONL)}), 400, param="purpose")
    assert_openai_error(http.post("/v1/files", json={"purpose": "fine-tune"}), 400)
    two_files = [("file", ("a.jsonl", JSONL)), ("file", ("b.jsonl", JSONL))]
    assert_openai_error(http.post("/v1/files", data={"purpose": "fine-tune"}, files=two_files), 400, param="file")
    with pytest.raises(openai.BadRequestError):
        client.files.create(
            file=("x.jsonl", JSONL), purpose="fine-tune", expires_after={"anchor": "created_at", "seconds": 3600}
        )
    truncated = httpx.Request("POST", "/", data={"purpose": "fine-tune"}, files={"file": ("a", JSONL)})
    body = truncated.read()[:-40]
    headers = {"content-type": truncated.headers["content-type"]}
    assert_openai_error(http.post("/v1/files", content=body, headers=headers), 400)


def test_a_file_sent_as_json_is_stored_as_an_upload_would_be(client, http):
    """The JSON form, for paths that forward JSON only (vllm-router): the openai client's `post`."""
    body = {"purpose": "fine-tune", "filename": "train.jsonl", "content": JSONL.decode()}
    stored = client.post("/files", body=body, cast_to=openai.types.FileObject)
    assert (stored.filename, stored.purpose, stored.bytes) == ("train.jsonl", "fine-tune", len(JSONL))
    assert client.files.content(stored.id).content == JSONL
    for bad, param in (({"content": None}, "content"), ({"filename": ""}, "filename"),
                       ({"purpose": "batch"}, "purpose"), ({"note": "x"}, "note")):
        assert_openai_error(http.post("/v1/files", json=body | bad), 400, param=param)
    malformed = http.post("/v1/files", content=b'{"purpose": ', headers={"content-type": "application/json"})
    assert_openai_error(malformed, 400)


@pytest.mark.parametrize(
    "params, param",
    [({"limit": 0}, "limit"), ({"limit": 10001}, "limit"), ({"limit": "x"}, "limit"), ({"order": "sideways"}, "order")],
)
def test_bad_list_params_400(http, params, param):
    assert_openai_error(http.get("/v1/files", params=params), 400, param=param)


def test_restart_keeps_every_file(files_server):
    client = files_server.client()
    client.files.create(file=("last.jsonl", JSONL), purpose="fine-tune")
    before = client.files.list().data
    contents = {f.id: client.files.content(f.id).content for f in before}
    files_server.live.stop()
    # A clean shutdown closed the database, which folds the write-ahead log back into it.
    assert not (files_server.data_dir / "coserve.sqlite3-wal").exists()
    files_server.live = start_server(files_server.data_dir)
    client = files_server.client()
    assert client.files.list().data == before
    assert {f.id: client.files.content(f.id).content for f in before} == contents
    leftovers = [p.name for p in (files_server.data_dir / "files").iterdir() if not p.name.startswith("file-")]
    assert leftovers == []


# In-process: the store itself, and limits too costly to reach over a real socket.


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store.open(tmp_path / "data")
    yield store
    store.close()


def put(store: Store, owner: str):
    with store.files.upload() as upload:
        upload.write(JSONL)
        return upload.commit(owner, "train.jsonl", "fine-tune")


def test_store_isolates_owners(store):
    mine, theirs = put(store, "alice"), put(store, "bob")
    files = store.files
    assert files.get("alice", mine.id) == mine
    for call in (files.get, files.open, files.delete):
        with pytest.raises(FileNotFound):
            call("alice", theirs.id)
    with pytest.raises(FileNotFound):
        files.list("alice", limit=10, after=theirs.id)
    assert [r.id for r in files.list("alice", limit=10).records] == [mine.id]
    assert [r.id for r in files.list("bob", limit=10).records] == [theirs.id]
    record, contents = files.open("bob", theirs.id)
    with contents:
        assert record == theirs and contents.read() == JSONL


def test_store_discards_uncommitted_uploads(store):
    with pytest.raises(RuntimeError), store.files.upload() as upload:
        upload.write(b"partial")
        raise RuntimeError("client went away")
    assert list(store.files.root.iterdir()) == []
    assert store.files.list("alice", limit=10).records == []


def test_store_sweeps_leftovers_at_open(tmp_path):
    store = Store.open(tmp_path)
    kept = put(store, "alice")
    store.close()
    (tmp_path / "files" / f"{TEMP_PREFIX}interrupted").write_bytes(b"half")
    (tmp_path / "files" / "file-0123456789abcdef01234567").write_bytes(b"renamed but never committed")
    store = Store.open(tmp_path)
    try:
        assert [p.name for p in (tmp_path / "files").iterdir()] == [kept.id]
        assert store.files.get("alice", kept.id) == kept
    finally:
        store.close()


def test_store_locks_its_directory_and_checks_the_schema(tmp_path):
    store = Store.open(tmp_path)
    with pytest.raises(StoreError, match="in use"):
        Store.open(tmp_path)
    store.close()
    with sqlite3.connect(tmp_path / "coserve.sqlite3") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
        conn.execute("UPDATE schema_version SET version = 999")
    with pytest.raises(StoreError, match="newer"):
        Store.open(tmp_path)


def local_client(
    store: Store, keys: KeyRing | None = None, max_upload_bytes: int = 512 * 1024**2, quota: int = 0,
    max_request_body_bytes: int = 16 * 1024**2,
) -> TestClient:
    """The files routes in-process; `keys` None = a server without keys."""
    app = FastAPI()
    settings = SimpleNamespace(max_upload_bytes=max_upload_bytes, max_stored_bytes_per_owner=quota,
                               max_request_body_bytes=max_request_body_bytes)
    app.state.ctx = SimpleNamespace(keys=keys or KeyRing(None, None), store=store, settings=settings)
    install_error_handlers(app)
    app.include_router(files_route.router, dependencies=[Depends(authenticate)])
    return TestClient(app)


def test_upload_size_limit_413(store):
    http = local_client(store, max_upload_bytes=1000)
    accepted = upload(http, b"x" * 1000).json()
    assert accepted["bytes"] == 1000
    # Over the file limit by one byte, then beyond what Content-Length may declare.
    for size in (1001, 1000 + files_route.MAX_FORM_OVERHEAD_BYTES):
        assert_openai_error(upload(http, b"x" * size), 413, param="file", code="file_too_large")
    assert [p.name for p in store.files.root.iterdir()] == [accepted["id"]]


def test_json_upload_limits_413(store):
    """A JSON body is parsed in memory: bounded by max_request_body_bytes, its text by max_upload_bytes."""
    http = local_client(store, max_upload_bytes=1000, max_request_body_bytes=2000)
    body = {"purpose": "fine-tune", "filename": "x.jsonl"}
    assert http.post("/v1/files", json=body | {"content": "x" * 1000}).json()["bytes"] == 1000
    too_long = http.post("/v1/files", json=body | {"content": "x" * 1001})
    assert_openai_error(too_long, 413, param="file", code="file_too_large")
    too_big = http.post("/v1/files", json=body | {"content": "x" * 2000})
    assert_openai_error(too_big, 413, code="request_too_large")
    assert len(list(store.files.root.iterdir())) == 1


def test_each_owner_sees_only_its_files_and_admins_see_all(store, tmp_path):
    http = local_client(store, KeyRing(write_keys_file(tmp_path / "keys.yaml"), None))

    def as_owner(owner: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TENANT_KEYS[owner]}"}

    made = http.post(
        "/v1/files", files={"file": ("a.jsonl", JSONL)}, data={"purpose": "fine-tune"}, headers=as_owner("team-a")
    ).json()
    for request in (http.get, http.delete):
        assert_openai_error(request(f"/v1/files/{made['id']}", headers=as_owner("team-b")), 404, code="file_not_found")
    content = http.get(f"/v1/files/{made['id']}/content", headers=as_owner("team-b"))
    assert_openai_error(content, 404, code="file_not_found")
    # Nor may it page through the other owner's list from a cursor it guessed.
    listed = http.get("/v1/files", params={"after": made["id"]}, headers=as_owner("team-b"))
    assert_openai_error(listed, 404, param="after")
    assert http.get("/v1/files", headers=as_owner("team-b")).json()["data"] == []
    assert http.get(f"/v1/files/{made['id']}", headers=as_owner("team-a")).json() == made
    assert [f["id"] for f in http.get("/v1/files", headers=as_owner("ops")).json()["data"]] == [made["id"]]
    # The row records the owner's name, never the key.
    assert store.files.get("team-a", made["id"]).owner == "team-a"
    for database_file in store.files.root.parent.glob("coserve.sqlite3*"):  # with the WAL
        assert TENANT_KEYS["team-a"].encode() not in database_file.read_bytes()
    assert http.delete(f"/v1/files/{made['id']}", headers=as_owner("ops")).json()["deleted"] is True




def test_names_never_reach_outside_the_store(store):
    """A file name is only metadata, and a file id in a path names only a row: neither
    `..` nor an absolute path reaches outside `<data_dir>/files`."""
    http = local_client(store)
    outside = store.files.root.parent / "escape.jsonl"
    for filename in ("../escape.jsonl", "../../escape.jsonl", str(outside), "..\\escape.jsonl"):
        made = http.post("/v1/files", files={"file": (filename, JSONL)}, data={"purpose": "fine-tune"}).json()
        assert made["filename"] == filename
        assert (store.files.root / made["id"]).read_bytes() == JSONL
    assert not outside.exists()
    assert list(store.files.root.parent.parent.rglob("escape*")) == []
    # Encoded, so that no client normalises the `..` away before it reaches the server.
    for file_id in ("..%2Fcoserve.sqlite3", "%2E%2E%2Fcoserve.lock", "..%2F..%2Fescape.jsonl"):
        for request in (http.get, http.delete):
            assert request(f"/v1/files/{file_id}").status_code == 404
        assert http.get(f"/v1/files/{file_id}/content").status_code == 404
    assert (store.files.root.parent / "coserve.sqlite3").exists() and (store.files.root.parent / "coserve.lock").exists()


def test_stored_bytes_per_owner(store, tmp_path):
    http = local_client(store, KeyRing(write_keys_file(tmp_path / "keys.yaml"), None), quota=3 * len(JSONL))

    def put_as(owner: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TENANT_KEYS[owner]}"}
        return http.post("/v1/files", files={"file": ("a.jsonl", JSONL)}, data={"purpose": "fine-tune"}, headers=headers)

    kept = [put_as("team-a").json()["id"] for _ in range(3)]
    error = assert_openai_error(put_as("team-a"), 413, param="file", code="storage_quota_exceeded")
    assert f"max_stored_bytes_per_owner={3 * len(JSONL)}" in error["message"]
    assert put_as("team-b").status_code == 200  # each owner has its own quota
    # Nothing of the refused upload stays on disk; deleting a file makes room again.
    assert len(list(store.files.root.iterdir())) == 4
    http.delete(f"/v1/files/{kept[0]}", headers={"Authorization": f"Bearer {TENANT_KEYS['team-a']}"})
    assert put_as("team-a").status_code == 200
