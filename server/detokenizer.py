"""Incremental detokenization of one generated sequence.

Decoding token by token is wrong for byte-level tokenizers (a character may span
several tokens) and for tokenizers whose pieces change spelling with their left
neighbour (SentencePiece's leading space). So each step decodes a short window that
starts a few tokens back, and emits only what that window adds beyond its already
emitted prefix. Text ending in U+FFFD is an unfinished multi-byte character: it is
held back until the next token completes it (or the sequence ends).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Prompt tokens decoded in front of the first generated one, so that its spelling
# (leading space, merges) is what it would be in the full text.
_PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._window = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # _window[:_read_offset] is already emitted; _window[:0] is the decoding context start.
        self._read_offset = len(self._window)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """Append generated tokens; return the text they complete (maybe empty)."""
        self._window.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the sequence, emit whatever is held back, complete or not."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self._window[: self._read_offset])
        full = self._decode(self._window)
        if len(full) <= len(emitted) or (full.endswith(_INCOMPLETE_CHARACTER) and not final):
            return ""
        # The tokens just emitted become the context of the next step.
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        return full[len(emitted) :]
