"""StructuredOutput specs -> xgrammar grammars, compiled for one model's vocabulary.

xgrammar was chosen over llguidance and outlines-core by measurement
(bench/bench_grammar.py): the least per-token work at 32 and 64 concurrent matchers.
Compiling a schema takes milliseconds (2-8 ms for the benchmark's schemas on the 2-core
Xeon), so the engine compiles at admission, in `LLMEngine.add_request`, and keeps the
compiled grammars by spec: a repeated schema costs a dictionary lookup. Compiling in
the server process instead would not save the engine the work: loading a serialized
compiled grammar measured as long as compiling it.

`parse` is also what the server calls to check a request, so whatever passes there
compiles here.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

import xgrammar as xgr

from engine.messages import StructuredOutput

log = logging.getLogger(__name__)

# Compiled grammars kept; each holds a few hundred kB (its token-mask cache).
MAX_CACHED = 128
# JSON without free whitespace: the separators vLLM uses when asked for none.
_COMPACT = (",", ":")


class GrammarError(ValueError):
    """A spec that does not describe a grammar; the message says why."""


def parse(spec: StructuredOutput) -> xgr.Grammar:
    """The grammar a spec describes; raises GrammarError with xgrammar's reason.

    Besides the kinds StructuredOutput lists, kind "structural_tag" takes an xgrammar
    structural tag (JSON text): the server's tool-call grammars (server/tools/grammar.py)."""
    try:
        if spec.kind == "json":
            return xgr.Grammar.from_json_schema(
                spec.spec, any_whitespace=spec.any_whitespace, separators=None if spec.any_whitespace else _COMPACT
            )
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.spec)
        if spec.kind == "choice":
            # JSON string literals are EBNF string literals (quotes and escapes alike).
            choices = json.loads(spec.spec)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        if spec.kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(spec.spec)
    except RuntimeError as exc:
        raise GrammarError(_reason(exc)) from None
    raise GrammarError(f"unknown structured output kind {spec.kind!r}")


def _reason(exc: RuntimeError) -> str:
    """xgrammar's message without its '[time] file.cc:line: ' prefix."""
    text = str(exc).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


class GrammarCompiler:
    """Matchers for specs; the compiled grammar behind them cached by spec (LRU)."""

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, stop_token_ids: Iterable[int],
                 max_cached: int = MAX_CACHED):
        """load_tokenizer: returns the model's Hugging Face tokenizer, called on the first
        guided request (a server that never sees one never loads it). vocab_size: the
        width of the logits, which may exceed the tokenizer's. stop_token_ids: the
        tokens that end a sequence; a complete grammar allows only these."""
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._max_cached = max_cached
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[StructuredOutput, xgr.CompiledGrammar] = OrderedDict()
        self.num_compiled = 0

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._load_tokenizer(), vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
            )
            # Our cache holds the compiled grammars; xgrammar's own would keep second copies.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compiled(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """Raises GrammarError for a spec that is not a grammar."""
        grammar = self._cache.get(spec)
        if grammar is not None:
            self._cache.move_to_end(spec)
            return grammar
        try:
            grammar = self._xgr_compiler().compile_grammar(parse(spec))
        except RuntimeError as exc:
            raise GrammarError(_reason(exc)) from None
        self.num_compiled += 1
        self._cache[spec] = grammar
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutput) -> xgr.GrammarMatcher:
        """A fresh matcher at the grammar's start; raises GrammarError."""
        return xgr.GrammarMatcher(self.compiled(spec))
