"""API keys: the keys file, the single admin key, reload, and the request check, in-process."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from server.api_keys import KeyRing, KeysFileError, Principal, read_keys_file
from server.auth import authenticate, principal_of, require_admin
from server.errors import install_error_handlers
from tests.server.conftest import TENANT_KEYS, assert_openai_error, write_keys_file

pytestmark = pytest.mark.server


def whoami_app(keys: KeyRing) -> TestClient:
    app = FastAPI()
    app.state.ctx = type("Context", (), {"keys": keys})()
    install_error_handlers(app)

    @app.get("/v1/whoami", dependencies=[Depends(authenticate)])
    def whoami(request: Request) -> dict:
        return asdict(principal_of(request))

    @app.post("/v1/admin-only", dependencies=[Depends(authenticate), Depends(require_admin)])
    def admin_only() -> dict:
        return {"ok": True}

    return TestClient(app)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_file_owners_and_roles(tmp_path):
    http = whoami_app(KeyRing(write_keys_file(tmp_path / "keys.yaml"), None))
    assert http.get("/v1/whoami", headers=bearer(TENANT_KEYS["team-a"])).json() == {"owner": "team-a", "admin": False}
    assert http.get("/v1/whoami", headers=bearer(TENANT_KEYS["ops"])).json() == {"owner": "ops", "admin": True}
    assert_openai_error(http.post("/v1/admin-only", headers=bearer(TENANT_KEYS["team-a"])), 403, code="admin_required")
    assert http.post("/v1/admin-only", headers=bearer(TENANT_KEYS["ops"])).json() == {"ok": True}
    for headers in ({}, bearer("sk-not-a-key-0123456789"), {"Authorization": TENANT_KEYS["team-a"]}):
        denied = http.get("/v1/whoami", headers=headers)
        assert_openai_error(denied, 401, code="invalid_api_key")
        assert denied.headers["www-authenticate"] == "Bearer"


def test_single_key_is_an_admin_beside_the_file(tmp_path):
    http = whoami_app(KeyRing(write_keys_file(tmp_path / "keys.yaml"), "the-operators-own-key"))
    assert http.get("/v1/whoami", headers=bearer("the-operators-own-key")).json() == {"owner": "admin", "admin": True}
    assert http.get("/v1/whoami", headers=bearer(TENANT_KEYS["team-b"])).json()["owner"] == "team-b"


def test_without_keys_every_caller_is_the_single_tenant():
    http = whoami_app(KeyRing(None, None))
    assert http.get("/v1/whoami").json() == {"owner": "default", "admin": True}


def test_json_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "k" * 16, "owner": "team.x_1"}]}))
    assert read_keys_file(path) == {hashlib.sha256(b"k" * 16).digest(): Principal("team.x_1", False)}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("keys: [{key: short, owner: a}]", "at least 16"),
        ("keys: [{key: 0123456789abcdefgh, owner: 'a:b'}]", "owner"),
        ("keys: [{key: 0123456789abcdefgh, owner: a, role: root}]", "role"),
        ("keys: [{key: 0123456789abcdefgh, owner: a, note: x}]", "note"),
        ("keys: [{key: 0123456789abcdefgh, owner: a}, {key: 0123456789abcdefgh, owner: b}]", "keys[1] repeats"),
        ("[1, 2]", "keys"),
        ("keys: [", "keys.yaml"),
    ],
)
def test_bad_keys_files_are_refused_naming_the_problem(tmp_path, text, complaint):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeysFileError) as refused:
        KeyRing(path, None)
    assert complaint in str(refused.value) and str(path) in str(refused.value)


def test_missing_keys_file_is_refused(tmp_path):
    with pytest.raises(KeysFileError, match="keys.yaml"):
        KeyRing(tmp_path / "keys.yaml", None)


def test_reload_takes_new_keys_and_keeps_the_old_on_a_bad_file(tmp_path, caplog):
    path = write_keys_file(tmp_path / "keys.yaml")
    keys = KeyRing(path, None)
    write_keys_file(path, {"team-c": "sk-team-c-0123456789abcdef"})
    keys.reload()
    assert keys.authenticate("sk-team-c-0123456789abcdef") == Principal("team-c", False)
    assert keys.authenticate(TENANT_KEYS["team-a"]) is None
    path.write_text("keys: nonsense")
    with caplog.at_level(logging.ERROR):
        keys.reload()
    assert "previous ones stay in force" in caplog.text
    assert keys.authenticate("sk-team-c-0123456789abcdef") == Principal("team-c", False)
