"""Model output -> content and tool calls, piece by piece as it streams.

The output is text with calls in it (server/tools/markup.py):

    Let me look.\\n<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>

`ToolCallParser.feed` takes each new piece of text and returns what may be said of it
now: content outside the calls, a call's start (its name, as soon as the head is
complete) and pieces of its arguments. Text that may still turn out to be markup (a
partial `<tool_call>`, the braces and tag closing a call) is held back until the next
piece decides it, so markup never reaches the content and the argument pieces add up to
exactly the arguments. Content is stripped of the whitespace at its ends and around
the calls' positions (joined as written), so empty content is no content.

The non-streaming answer is the same parser fed the whole text at once, so both agree
by construction. Under the tool grammar every call is well formed; a block that never
names a function (cut off by max_tokens inside its head) yields nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from server.tools import markup

# A call's head, up to the first character of its arguments (which must have arrived,
# so that whitespace before the arguments is never taken for part of them).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
# After the arguments object: the outer object's brace, with whitespace either side.
_OUTER_CLOSE = re.compile(r"\s*\}?\s*$")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    index: int
    id: str | None = None  # with the name, on a call's first delta only
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


@dataclass
class ParsedOutput:
    content: str | None
    calls: list[ParsedCall]


class ToolCallParser:
    def __init__(self):
        self._pending = ""  # text not yet said
        self._in_call = False
        self._call: ParsedCall | None = None  # the open call once its head is read
        self._args_said = 0  # characters of the open call's arguments already returned
        self._spaces = ""  # whitespace after the last content, said only if content follows
        self._said_content = False
        self.calls: list[ParsedCall] = []

    def feed(self, text: str) -> ParsedDelta:
        self._pending += text
        delta = ParsedDelta()
        while self._step(delta):
            pass
        return delta

    def finish(self) -> ParsedDelta:
        """The rest, at the end of the output (which may cut a call short)."""
        delta = ParsedDelta()
        if not self._in_call:
            self._content(self._pending, delta)
        elif self._call is not None:
            self._arguments(_without_partial(self._pending, markup.CALL_END), delta)
        self._pending = ""
        return delta

    def _step(self, delta: ParsedDelta) -> bool:
        """Consumes what can be decided; True while there may be more."""
        if not self._in_call:
            begin = self._pending.find(markup.CALL_BEGIN)
            if begin < 0:
                said = len(_without_partial(self._pending, markup.CALL_BEGIN))
                self._content(self._pending[:said], delta)
                self._pending = self._pending[said:]
                return False
            self._content(self._pending[:begin], delta)
            self._pending = self._pending[begin + len(markup.CALL_BEGIN):]
            self._in_call = True
            return True
        end = self._pending.find(markup.CALL_END)
        if self._call is None:
            head = _HEAD.match(self._pending)
            if head is None or (0 <= end < head.end()):
                if end >= 0:  # a block without a name: nothing to report
                    self._close_call(end)
                    return True
                return False
            self._open_call(json.loads(f'"{head.group(1)}"'), delta)
            self._pending = self._pending[head.end():]
            return True
        if end < 0:
            self._arguments(_without_partial(self._pending, markup.CALL_END), delta)
            return False
        self._arguments(self._pending[:end], delta)
        self._close_call(end)
        return True

    def _open_call(self, name: str, delta: ParsedDelta) -> None:
        self._call = ParsedCall(new_call_id(), name, "")
        self._args_said = 0
        self.calls.append(self._call)
        delta.calls.append(CallDelta(len(self.calls) - 1, self._call.id, name))

    def _close_call(self, end: int) -> None:
        self._pending = self._pending[end + len(markup.CALL_END):]
        self._in_call = False
        self._call = None

    def _arguments(self, text: str, delta: ParsedDelta) -> None:
        """text: the open call's arguments so far, with what may close the call after them."""
        arguments = text[: _OUTER_CLOSE.search(text).start()]
        piece = arguments[self._args_said:]
        if piece:
            self._call.arguments += piece
            self._args_said = len(arguments)
            index = len(self.calls) - 1
            # A call's first delta announces it with empty arguments, as OpenAI's does.
            if delta.calls and delta.calls[-1].index == index and delta.calls[-1].id is None:
                delta.calls[-1].arguments += piece
            else:
                delta.calls.append(CallDelta(index, arguments=piece))

    def _content(self, text: str, delta: ParsedDelta) -> None:
        words = text.rstrip()
        if words:
            lead = self._spaces if self._said_content else ""
            delta.content += lead + (words if self._said_content else words.lstrip())
            self._said_content = True
            self._spaces = text[len(words):]
        else:
            self._spaces += text


def _without_partial(text: str, tag: str) -> str:
    """text without its longest ending that could be the start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return text[:-n]
    return text


def parse_tool_calls(text: str) -> ParsedOutput:
    """A whole output at once, as streaming would have said it."""
    parser = ToolCallParser()
    content = parser.feed(text).content + parser.finish().content
    return ParsedOutput(content or None, parser.calls)
