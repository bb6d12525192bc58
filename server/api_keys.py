"""Who a bearer key belongs to: the keys file, the single `--api-key`, and their reload.

The keys file (`api_keys_file`, YAML or JSON) maps each key to an owner and a role:

    keys:
      - {key: "sk-team-a-...", owner: team-a}
      - {key: "sk-ops-...", owner: ops, role: admin}

An owner owns the files, jobs, checkpoints and fine-tuned models its keys create; an
admin also sees everyone's and may load adapters at run time. `api_key` is one more
admin key (owner `admin`). With neither set the server is single-tenant: every caller
is the admin owner `default`.

Keys are held only as SHA-256 digests, looked up in a dict: the comparison never runs
over the secret itself, so its timing tells nothing about a key. SIGHUP re-reads the
file; a file that no longer parses leaves the previous keys in force (and says so in
the log), so a typo cannot lock every tenant out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

SINGLE_KEY_OWNER = "admin"
UNAUTHENTICATED_OWNER = "default"


@dataclass(frozen=True)
class Principal:
    owner: str
    admin: bool

    @property
    def owner_scope(self) -> str | None:
        """The owner whose objects this caller may see; None = every owner's (admins)."""
        return None if self.admin else self.owner

    def may_use(self, owner: str | None) -> bool:
        """Whether an object of `owner` (None = shared, such as the base model) is visible."""
        return owner is None or self.admin or owner == self.owner


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=16, description="The bearer token; at least 16 characters")
    # Owners appear in fine-tuned model names (`ft:<model>:<owner>:...`), hence no colons.
    owner: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    role: Literal["user", "admin"] = "user"


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry]


class KeysFileError(ValueError):
    """The keys file cannot be read or does not have the documented shape."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys_file(path: Path) -> dict[bytes, Principal]:
    """Key digest -> principal, from a YAML or JSON file (JSON is YAML too, but its errors read better)."""
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        entries = KeysFile.model_validate(raw).keys
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        # pydantic's ValidationError is a ValueError; its text names the entry and field.
        raise KeysFileError(f"api_keys_file {path}: {exc}") from None
    principals: dict[bytes, Principal] = {}
    for number, entry in enumerate(entries):
        digest = _digest(entry.key)
        if digest in principals:
            raise KeysFileError(f"api_keys_file {path}: keys[{number}] repeats an earlier key")
        principals[digest] = Principal(entry.owner, entry.role == "admin")
    return principals


class KeyRing:
    """The keys in force. `authenticate` answers None for an unknown key."""

    def __init__(self, keys_file: Path | None, single_key: str | None):
        self._keys_file = keys_file
        self._single = {_digest(single_key): Principal(SINGLE_KEY_OWNER, True)} if single_key else {}
        self._principals = self._read()

    @property
    def open(self) -> bool:
        """No key configured at all: a single-tenant server."""
        return self._keys_file is None and not self._single

    def authenticate(self, token: str) -> Principal | None:
        if self.open:
            return Principal(UNAUTHENTICATED_OWNER, True)
        return self._principals.get(_digest(token))

    def principal_for(self, authorization: str) -> Principal | None:
        """The caller an `Authorization` header names (`Bearer <key>`); None = refused."""
        scheme, _, token = authorization.partition(" ")
        if not self.open and scheme.lower() != "bearer":
            return None
        return self.authenticate(token.strip())

    def reload(self) -> None:
        """Re-reads the keys file (SIGHUP); keeps the keys in force when it does not parse."""
        if self._keys_file is None:
            return
        try:
            self._principals = self._read()
        except KeysFileError as exc:
            log.error("keys not reloaded, the previous ones stay in force: %s", exc)
            return
        log.info("reloaded %d API key(s) from %s", len(self._principals) - len(self._single), self._keys_file)

    def _read(self) -> dict[bytes, Principal]:
        from_file = read_keys_file(self._keys_file) if self._keys_file is not None else {}
        # The single key wins a clash: it is the operator's own.
        return from_file | self._single

