"""OpenAI request and response shapes (pydantic), plus coserve's extras.

Requests validate every value range here, so a bad value is a 400 naming the field
before anything reaches the engine. Features that would silently change meaning
(images, the legacy `functions`) are rejected explicitly by the routes.
`None` always means "the default", because clients send explicit nulls.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from server import errors
from server.router_fields import without_router_no_ops
from server.tools.schema import check_parameters_schema

MAX_STOP_STRINGS = 4
# A stop string is matched against every new piece of text, so its length is bounded.
MAX_STOP_STRING_CHARS = 256
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20

# OpenAI's rule for function names.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
TokenId = Annotated[int, Field(ge=0)]


def lone_surrogate_path(value: Any) -> tuple | None:
    """The path of the first string (or key) holding a lone UTF-16 surrogate, or None.
    Iterative: a body may nest deeper than Python's recursion limit."""
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            children = [((*path, key), part) for key, child in item.items() for part in (key, child)]
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([((*path, i), child) for i, child in enumerate(item)]))
    return None


class _UnicodeBody(BaseModel):
    """A request body whose strings are all valid Unicode. JSON's \\uD800-style escapes
    can spell a lone surrogate, which no tokenizer or grammar library can take; it is a
    400 naming the field here, before anything reaches them."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        path = lone_surrogate_path(data)
        if path is not None:
            # The path may run through the key at fault: written with its escape.
            param = ".".join(str(p).encode("utf-8", "backslashreplace").decode() for p in path) or None
            # An APIError passes through pydantic untouched, so the 400 names the field.
            raise errors.bad_request(f"{param or 'the body'} holds a lone surrogate (invalid Unicode text)", param)
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class RequestSLO(BaseModel):
    """Per-request latency targets (coserve extra field `slo`); unset = the server's."""

    model_config = ConfigDict(extra="forbid")

    ttft_ms: float | None = Field(None, gt=0, description="Time-to-first-token target, ms")
    tpot_ms: float | None = Field(None, gt=0, description="Time-per-output-token target, ms")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    # `schema` would shadow a BaseModel method, hence the alias.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    # Accepted and always honoured: the output follows the schema either way.
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format` (vLLM takes it on completions too)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra field: one constraint (json, regex, choice or
    json_object) and its options. grammar, structural_tag and whitespace_pattern are
    vLLM's too but not served here; they get a 400 naming them (server/structured.py)."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    json_object: bool | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    # Accepted for vLLM's clients; properties a schema does not list are never generated
    # anyway unless it allows them explicitly (xgrammar's strict mode).
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class GenerationRequest(_UnicodeBody):
    """Fields that completions and chat share. A field not listed here is rejected with a
    400 naming it, never dropped (but for the no-ops a router adds, server/router_fields.py)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _router_no_ops(cls, data: Any) -> Any:
        return without_router_no_ops(data)

    model: str | None = None
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as vLLM takes it
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM-style: logits of tokens already in the prompt or output divided by it (positive)
    # or multiplied (negative); 1 = off. vLLM's own benchmark client sends 1.0.
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    # Token id (as a string, as OpenAI sends it) -> bias added to its logit.
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extras (the openai client sends them via `extra_body`).
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool | None = False
    stop_token_ids: list[TokenId] | None = None
    # coserve extra: this request's own SLOs (the openai client sends it via `extra_body`).
    slo: RequestSLO | None = None
    # coserve extra: keep this request's KV cached for this many seconds after it ends,
    # so that a follow-up (an agent's next turn after a tool call) finds it even under
    # cache pressure; at most the server's max_kv_ttl_s.
    kv_ttl: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Guided decoding, OpenAI's way and vLLM's (server/structured.py).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: (
        Annotated[str, Field()]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: int | None = Field(16, ge=1, description="None = until the context is full")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None


class FunctionDefinition(BaseModel):
    """A function the model may call (`tools[].function`)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
    description: str | None = None
    # A JSON schema of an object; None: no arguments.
    parameters: dict[str, Any] | None = None
    # Accepted and always honoured: whenever a call is generated, its arguments follow
    # the schema (server/tools/grammar.py).
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_parameters_schema(schema)
        return schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice` naming the one function the model must call."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    """A call the assistant made: in a response, and in the history a client sends back."""

    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A key OpenAI does not define is a 400 naming it. OpenAI's other message fields,
    which clients send back with an assistant message they received, are accepted empty;
    with a value they are refused (server/prompts.py), since this server does not act on them.
    Which role may carry tool_calls and tool_call_id is checked there too, naming the message."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None
    annotations: list[Any] | None = None

    def unsupported_fields(self) -> list[str]:
        """Those of OpenAI's fields this server does not act on that carry a value."""
        return [name for name in ("function_call", "refusal", "audio", "annotations") if getattr(self, name)]


class ChatCompletionRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: Annotated[list[Tool], Field(min_length=1)] | None = None
    # Unset: "auto" with tools, as OpenAI has it.
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # unset: true
    # OpenAI's deprecated function calling: refused by name (server/tools/policy.py).
    functions: list[Any] | None = None
    function_call: Any = None


class TokenizeRequest(_UnicodeBody):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[TokenId]


# ---- responses -------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV the prefix cache held


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    # coserve extra, only where a power device is watched: the energy the engine
    # attributed to this request's iterations (engine/energy.py), in joules.
    energy_joules: float | None = None

    @model_serializer(mode="wrap")
    def _omit_energy_without_a_device(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: only tool calls
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_only_when_made(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_fields(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(BaseModel):
    """A call's first delta has its id, type and name (arguments ""); the following ones
    carry only its index and the next piece of its arguments, as OpenAI streams them."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _omit_unset_fields(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_fields(self, handler) -> dict:
        # OpenAI deltas carry only what changed: the role once, then content.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "coserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str
