"""`coserve serve`: resolve the model, start the engine, then listen.

Every flag is generated from `server.settings.Settings`, so `coserve serve --help`
documents each setting with its default and environment variable, and a new
setting needs no CLI code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from server.settings import ENV_PREFIX, Settings

log = logging.getLogger("coserve")


def _flag_type(annotation) -> tuple[type, list | None, str | None]:
    """(argparse type, choices, nargs) for a field annotation such as `int | None`, a Literal or a list."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation)), None
    if typing.get_origin(annotation) is list:
        item_type, _, _ = _flag_type(typing.get_args(annotation)[0])
        return item_type, None, "*"
    return (annotation if annotation in (int, float, Path) else str), None, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coserve", description="OpenAI-compatible LLM server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve the OpenAI API",
        description="Serve the OpenAI API. Precedence: flags > COSERVE_* env vars > --config YAML > defaults.",
    )
    for name, field in Settings.model_fields.items():
        flag_type, choices, nargs = _flag_type(field.annotation)
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=flag_type,
            choices=choices,
            nargs=nargs,
            # Unset flags must not override env or YAML, so they stay out of the namespace.
            default=argparse.SUPPRESS,
            metavar=None if choices else name.upper(),
            help=f"{field.description} (default: {field.default}; env: {ENV_PREFIX}{name.upper()})",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    try:
        settings = Settings(**args)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"coserve: invalid settings: {exc}")
    sys.exit(serve(settings))


def serve(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    # Heavy imports after argument parsing, so `--help` and bad flags answer at once.
    from engine.model_files import ModelFilesError, resolve_model

    try:
        model_dir, default_name = resolve_model(settings.model, settings.cache_dir)
        engine_config = settings.engine_config(model_dir)
    except (ModelFilesError, ValueError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return asyncio.run(_run(settings, engine_config, settings.served_model_name or default_name))


async def _run(settings: Settings, engine_config, served_name: str) -> int:
    import uvicorn
    from transformers import AutoTokenizer

    from server.adapters import AdapterRegistry
    from server.api_keys import KeyRing, KeysFileError
    from server.app import create_app
    from server.context import ServerContext
    from server.engine_client import EngineClient, EngineStartError
    from server.finetune.manager import JobManager
    from server.generation import TokenTexts
    from server.prompts import PromptEncoder
    from server.shutdown import DrainingServer
    from server.store import Store, StoreError

    # Before the engine starts, so a bad keys file or an unusable data directory is
    # reported without loading weights.
    try:
        keys = KeyRing(settings.api_keys_file, settings.api_key)
        store = Store.open(settings.data_dir)
    except (KeysFileError, StoreError) as exc:
        log.error("cannot serve: %s", exc)
        return 1
    model_dir = engine_config.model_dir
    engine = EngineClient(engine_config, settings.max_queued_requests)
    try:
        # The tokenizer loads in a thread while the engine process loads the weights.
        tokenizer_loading = asyncio.create_task(asyncio.to_thread(AutoTokenizer.from_pretrained, model_dir))
        try:
            ready = await engine.start()
        except EngineStartError as exc:
            log.error("cannot serve: %s", exc)
            return 1
        tokenizer = await tokenizer_loading
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        adapters = AdapterRegistry(engine, served_name, settings.lora_roots, settings.lora_module_paths())
        jobs = JobManager(store, engine, adapters, tokenizer, served_name, model_dir, settings.data_dir)
        ctx = ServerContext(
            settings=settings,
            keys=keys,
            engine=engine,
            tokenizer=tokenizer,
            prompts=PromptEncoder(tokenizer, vocab_size, ready.max_model_len),
            texts=TokenTexts(tokenizer),
            served_model_name=served_name,
            adapters=adapters,
            store=store,
            jobs=jobs,
        )
        # Finished models are served again and unfinished jobs continue before we listen.
        await jobs.start()
        log.info("serving %s (max_model_len=%d, dtype=%s)", served_name, ready.max_model_len, ready.dtype)
        server = DrainingServer(
            uvicorn.Config(create_app(ctx), host=settings.host, port=settings.port, log_level=settings.log_level),
            engine,
            settings.drain_timeout_s,
        )
        await server.serve()
        return 0 if server.started and not server.engine_died else 1
    finally:
        await engine.shutdown()
        store.close()


if __name__ == "__main__":
    main()
