"""Pure pieces of the server, no model process: stop strings, detokenizer, settings, CLI."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.cli import build_parser
from server.detokenizer import IncrementalDetokenizer
from server.errors import _param_of
from server.settings import Settings
from server.stop_strings import StopStringMatcher

pytestmark = pytest.mark.unit


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(p) for p in pieces)
    return out if matcher.stopped else out + matcher.flush()


def test_stop_string_across_pieces_and_held_back():
    m = StopStringMatcher(["END"])
    assert m.feed("abc E") == "abc "  # "E" could start "END": held back
    assert m.feed("N") == ""
    assert m.feed("Dxyz") == "" and m.stopped and m.text == "abc "


def test_stop_false_alarm_released():
    m = StopStringMatcher(["END"])
    assert m.feed("xE") == "x"
    assert m.feed("Nx") == "ENx"
    assert feed_all(StopStringMatcher(["END"]), ["a", "E"]) == "aE"


def test_earliest_of_several_stops():
    assert feed_all(StopStringMatcher(["c", "ab"]), ["xabc"]) == "x"
    assert feed_all(StopStringMatcher([]), ["x", "y"]) == "xy"


@pytest.fixture(scope="module")
def tokenizer():
    from pathlib import Path

    from engine.model_files import resolve_model
    import os

    cache = Path(os.environ.get("COSERVE_CACHE_DIR", "~/.cache/coserve")).expanduser()
    return AutoTokenizer.from_pretrained(resolve_model(None, cache)[0])


@pytest.mark.model
def test_incremental_detokenizer_matches_full_decode(tokenizer):
    text = " héllo 日本語 wörld 🙂 done"
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("Say:")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_settings_precedence(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("port: 1000\nmax_num_seqs: 3\nhost: 0.0.0.0\n")
    monkeypatch.setenv("COSERVE_CONFIG", str(config))
    monkeypatch.setenv("COSERVE_PORT", "2000")
    s = Settings(max_num_seqs=5)
    assert (s.host, s.port, s.max_num_seqs) == ("0.0.0.0", 2000, 5)
    assert Settings().block_size == 16


def test_default_yaml_documents_every_setting():
    import yaml
    from pathlib import Path

    documented = yaml.safe_load((Path(__file__).parents[2] / "configs" / "default.yaml").read_text())
    assert set(documented) == set(Settings.model_fields) - {"config"}
    for name, value in documented.items():
        default = Settings.model_fields[name].default
        assert value == (str(default) if hasattr(default, "parts") else default), name


def test_cli_flags_cover_settings():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"COSERVE_{name.upper()}" in help_text.replace("\n", "").replace(" ", "")
    args = vars(build_parser().parse_args(["serve", "--port", "9", "--dtype", "float32"]))
    assert args == {"command": "serve", "port": 9, "dtype": "float32"}


def test_prefix_caching_flag_reaches_the_engine(tmp_path):
    args = vars(build_parser().parse_args(["serve", "--enable-prefix-caching", "false", "--max-kv-ttl-s", "30"]))
    args.pop("command")
    config = Settings(**args).engine_config(tmp_path)
    assert (config.enable_prefix_caching, config.max_kv_ttl_s) == (False, 30.0)
    assert Settings().engine_config(tmp_path).enable_prefix_caching is True


def test_error_param_from_union_loc():
    assert _param_of(("body", "stop", "list[constrained-str]")) == "stop"
    assert _param_of(("body", "messages", 0, "content", "str")) == "messages.0.content"
    assert _param_of(("body",)) is None
