"""Grammar libraries compared for guided decoding: xgrammar, llguidance, outlines-core.

One command, from the repository root, with the candidates importable (they need not be
in .venv: `pip install --no-deps --target DIR xgrammar llguidance outlines-core
apache-tvm-ffi`, then PYTHONPATH=DIR):

    .venv/bin/python bench/bench_grammar.py

For the default model's tokenizer (SmolLM2-135M-Instruct, 49,152 tokens) and each
library:
  * setup: the library's view of the tokenizer, built once per server;
  * compile: per JSON schema, from schema text to a matcher whose first token mask is
    filled (xgrammar and outlines-core compile ahead; llguidance builds lazily, so its
    first mask carries the work);
  * per-token overhead with 32 and 64 concurrent matchers (each on one of the schemas,
    walking a valid document of it token by token, as a decode iteration would):
    filling every row's token mask into one [batch, 1536] int32 bitmask, and advancing
    every matcher by its token; every mask is checked to allow the document's next
    token. Applying the masks to [batch, 49152] logits is the same code whichever
    library filled them (engine/grammar/bitmask.py) and is timed apart.
Each library fills with its batched, threaded call where it has one (xgrammar's
BatchGrammarMatcher, llguidance's LLExecutor), on the machine's cores. Times are
medians over the steps; the step timings run in --rounds rounds, libraries taking turns,
and each library's least disturbed round is kept (the machine is shared).

Writes bench/results/<date>-<time>-grammar.md (machine, date, commit, command) and
prints it. A few minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_serving import WORK, result_header  # noqa: E402
from bench.cpu_monitor import ForeignCpu, wait_for_quiet  # noqa: E402
from bench.grammar_schemas import SCHEMAS  # noqa: E402

BATCHES = (32, 64)
THREADS = 2


class XGrammar:
    name, dist = "xgrammar", "xgrammar"

    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=THREADS, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=THREADS)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matchers: list, tokens: list[int]) -> None:
        assert all(self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens))

    def reset(self, matcher) -> None:
        matcher.reset()


class LLGuidance:
    name, dist = "llguidance", "llguidance"

    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.executor = llguidance.LLExecutor(num_threads=THREADS)

    def compile(self, schema: dict):
        return self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        m = self.ll.LLMatcher(self.tokenizer, compiled)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        )

    def advance(self, matchers: list, tokens: list[int]) -> None:
        for m, t in zip(matchers, tokens):
            assert m.consume_token(t), m.get_error()

    def reset(self, matcher) -> None:
        matcher.reset()


class OutlinesCore:
    name, dist = "outlines-core", "outlines_core"

    def __init__(self, tokenizer, vocab: int):
        import outlines_core

        self.oc = outlines_core
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _byte_vocabulary(tokenizer, vocab))

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            row = bitmask[i]
            m.write_mask_into(row.data_ptr(), row.numel(), 4)

    def advance(self, matchers: list, tokens: list[int]) -> None:
        for m, t in zip(matchers, tokens):
            m.advance(t)

    def reset(self, matcher) -> None:
        matcher.reset()


def _byte_vocabulary(tokenizer, vocab: int) -> dict[bytes, list[int]]:
    """outlines-core wants each token's bytes; byte-level BPE spells them as printable
    stand-ins (GPT-2's table: 'Ġ' for a space), which this undoes. Special tokens and the
    EOS stay out (outlines-core adds the EOS itself)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_in = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            stand_in[chr(256 + n)] = b
            n += 1
    special = set(tokenizer.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id < vocab and token_id not in special:
            out.setdefault(bytes(stand_in[c] for c in token), []).append(token_id)
    return out


LIBRARIES = (XGrammar, LLGuidance, OutlinesCore)


def _walks(tokenizer, lib) -> list[tuple[object, list[int]]]:
    """(compiled grammar, one document's tokens) per (schema, document)."""
    walks = []
    for schema, documents in SCHEMAS.values():
        compiled = lib.compile(schema)
        for doc in documents:
            walks.append((compiled, tokenizer.encode(json.dumps(doc), add_special_tokens=False)))
    return walks


def compile_times(lib, repeats: int) -> dict[str, float]:
    """Median ms from schema to a first mask, per schema (each compile from scratch)."""
    out = {}
    bitmask = torch.zeros(1, 1536, dtype=torch.int32)
    for name, (schema, _) in SCHEMAS.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lib.fill([lib.matcher(lib.compile(schema))], bitmask)
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def step_times(lib, walks: list, batch: int, steps: int, vocab: int) -> dict[str, float]:
    """Per decode step with `batch` matchers: median ms to fill all masks, to advance all,
    and to apply the filled masks to [batch, vocab] logits (the engine's apply_bitmask,
    on the masks real states give). Every mask is checked to allow the document's next
    token, so a library that fills wrong masks cannot look fast."""
    from engine.grammar.bitmask import allowed, apply_bitmask, apply_bitmask_torch

    rows = [(lib.matcher(walks[i % len(walks)][0]), walks[i % len(walks)][1]) for i in range(batch)]
    # Rows start at different offsets into their documents, as live requests would.
    pos = [i % len(tokens) for i, (_, tokens) in enumerate(rows)]
    for (m, tokens), p in zip(rows, pos):
        for token in tokens[:p]:
            lib.advance([m], [token])
    bitmask = torch.zeros(batch, 1536, dtype=torch.int32)
    logits = torch.empty(batch, vocab)
    fill, advance, apply, apply_torch = [], [], [], []
    for _ in range(steps):
        for i, (m, tokens) in enumerate(rows):
            if pos[i] == len(tokens):  # document done: the next request on this row
                lib.reset(m)
                pos[i] = 0
        matchers = [m for m, _ in rows]
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        t1 = time.perf_counter()
        next_tokens = [tokens[p] for (_, tokens), p in zip(rows, pos)]
        lib.advance(matchers, next_tokens)
        t2 = time.perf_counter()
        assert allowed(bitmask, vocab)[torch.arange(batch), next_tokens].all(), f"{lib.name} masked a valid token"
        logits.normal_()
        t3 = time.perf_counter()
        apply_bitmask(logits, bitmask, list(range(batch)))
        t4 = time.perf_counter()
        apply_bitmask_torch(logits, bitmask, list(range(batch)))
        apply.append((t4 - t3) * 1e3)
        apply_torch.append((time.perf_counter() - t4) * 1e3)
        fill.append((t1 - t0) * 1e3)
        advance.append((t2 - t1) * 1e3)
        pos = [p + 1 for p in pos]
    return {"fill_ms": statistics.median(fill), "advance_ms": statistics.median(advance),
            "apply_ms": statistics.median(apply), "apply_torch_ms": statistics.median(apply_torch)}


def _better(a: dict | None, b: dict) -> dict:
    """Of two timings of the same work, the one less disturbed: the lower fill + advance."""
    return b if a is None or b["fill_ms"] + b["advance_ms"] < a["fill_ms"] + a["advance_ms"] else a


def measure(libs: dict, tokenizer, vocab: int, args: argparse.Namespace) -> dict:
    """Set each library up and time its compiles, then its steps in `args.rounds` rounds,
    the libraries taking turns in each: a burst of foreign load then slows one round of
    one library, and the least disturbed round of each is kept."""
    results, ready = {}, {}
    for name, lib_cls in libs.items():
        try:
            t0 = time.perf_counter()
            lib = lib_cls(tokenizer, vocab)
        except ImportError as exc:
            results[name] = {"error": f"not installed ({exc})"}
            continue
        setup_ms = (time.perf_counter() - t0) * 1e3
        wait_for_quiet(args.quiet_wait)
        results[name] = {"version": importlib.metadata.version(lib_cls.dist), "setup_ms": setup_ms,
                         "compile_ms": compile_times(lib, args.compile_repeats)}
        ready[name] = (lib, _walks(tokenizer, lib))
    for round_ in range(args.rounds):
        for name, (lib, walks) in ready.items():
            wait_for_quiet(args.quiet_wait)
            print(f"[grammar] round {round_ + 1}: {name}", flush=True)
            for batch in BATCHES:
                with ForeignCpu() as fc:
                    timing = step_times(lib, walks, batch, args.steps, vocab)
                timing["foreign_cpu_share"] = fc.share
                results[name][f"b{batch}"] = _better(results[name].get(f"b{batch}"), timing)
    return results


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Grammar libraries: compile time and per-token overhead",
        "",
        f"- date: {results['date']}; commit: {m['coserve_commit']}; command: `{results['command']}`",
        f"- machine: {m['cpu_model']}, {m['cores']} cores, torch {m['torch']}; {THREADS} threads for "
        f"batched mask fills; tokenizer: {results['model']} (vocabulary {results['vocab']})",
        f"- schemas: {', '.join(SCHEMAS)} (bench/grammar_schemas.py); {results['steps']} decode steps per batch "
        f"size; of {results['rounds']} rounds (libraries taking turns) the least disturbed kept per library and "
        "batch size; foreign CPU = the most other processes took during the kept timings",
        "",
        "Per decode step, all rows (ms, median): fill = every row's mask into one bitmask, advance = every "
        "matcher by its token. Per token = (fill + advance) / batch.",
        "",
        "| library | version | setup ms | " + " | ".join(f"b{b} fill | b{b} advance | b{b} µs/token" for b in BATCHES)
        + " | foreign CPU |",
        "|---|---|---:|" + "---:|---:|---:|" * len(BATCHES) + "---:|",
    ]
    for name, r in results["libraries"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |")
            continue
        cells = []
        for b in BATCHES:
            s = r[f"b{b}"]
            per_token_us = (s["fill_ms"] + s["advance_ms"]) * 1e3 / b
            cells += [f"{s['fill_ms']:.2f}", f"{s['advance_ms']:.2f}", f"{per_token_us:.0f}"]
        foreign = max(r[f"b{b}"]["foreign_cpu_share"] for b in BATCHES)
        lines.append(f"| {name} | {r['version']} | {r['setup_ms']:.0f} | " + " | ".join(cells) + f" | {foreign:.0%} |")
    lines += ["", "Compile, schema text to the first filled mask (ms, median of "
              f"{results['compile_repeats']}, no cache):", "",
              "| library | " + " | ".join(SCHEMAS) + " |", "|---|" + "---:|" * len(SCHEMAS)]
    for name, r in results["libraries"].items():
        if "error" not in r:
            lines.append(f"| {name} | " + " | ".join(f"{r['compile_ms'][s]:.1f}" for s in SCHEMAS) + " |")
    lines += ["", "Applying the filled masks to float32 logits (engine/grammar/bitmask.py, the same code for "
              "every library; ms per step, median): the CPU path (numpy) / torch ops (a GPU's path, "
              f"{THREADS} threads here):", ""]
    for name, r in results["libraries"].items():
        if "error" not in r:
            lines.append(f"- {name}'s masks: " + ", ".join(
                f"b{b} {r[f'b{b}']['apply_ms']:.2f} / {r[f'b{b}']['apply_torch_ms']:.2f}" for b in BATCHES))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="decode steps timed per batch size")
    ap.add_argument("--rounds", type=int, default=3, help="step timings per library, the best kept")
    ap.add_argument("--compile-repeats", type=int, default=5)
    ap.add_argument("--quiet-wait", type=float, default=20)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench/results")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)

    from transformers import AutoTokenizer

    from engine.model_files import resolve_model

    model_dir, name = resolve_model(None, WORK)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    started = dt.datetime.now()
    results = {**result_header(started, name), "vocab": vocab, "steps": args.steps, "rounds": args.rounds,
               "compile_repeats": args.compile_repeats,
               "libraries": measure({lib.name: lib for lib in LIBRARIES}, tokenizer, vocab, args)}
    md = report(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / started.strftime("%Y-%m-%d-%H%M%S-grammar.md")
    path.write_text(md + "\n")
    print("\n" + md + f"\n\nwrote {path}")


if __name__ == "__main__":
    main()
