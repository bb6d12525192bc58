"""Every message that crosses the server <-> engine boundary.

The server sends `EngineRequest` and `AbortRequests` to the engine; the engine
answers each iteration with one `EngineOutputs` batch. All are msgspec structs so
that a frame costs microseconds to encode, and a schema change is a type error in
one place instead of a dict key drifting between two processes.
"""

from __future__ import annotations

from typing import Literal

import msgspec

# What the server may ask of a running finetuning job, and the states the engine reports.
# msgspec refuses any other value when it decodes a message.
FinetuneAction = Literal["pause", "resume", "cancel"]
FinetuneStatus = Literal["running", "paused", "succeeded", "failed", "cancelled"]
FINISHED_STATUSES: tuple[FinetuneStatus, ...] = ("succeeded", "failed", "cancelled")


class StructuredOutput(msgspec.Struct, frozen=True):
    """A grammar the sampled tokens must follow, checked at the HTTP edge.

    kind "json": `spec` is a JSON schema (JSON text); "regex": a regular expression;
    "choice": a JSON list of the strings allowed; "structural_tag": an xgrammar structural
    tag (JSON text; the server's tool-call grammars, server/tools/grammar.py). `any_whitespace`: JSON may put any
    whitespace between its tokens (vLLM's default), else none at all ("," and ":").
    Equal values compile to the same grammar (engine/grammar/compiler.py caches by it)."""

    kind: str
    spec: str
    any_whitespace: bool = True


class SamplingParams(msgspec.Struct, frozen=True):
    """How to pick tokens for one sequence. Validated at the HTTP edge."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: prompt and output tokens, 1 = off
    # Number of top alternatives to report per generated token; None = no logprobs,
    # 0 = only the sampled token's logprob.
    logprobs: int | None = None
    # Same for the prompt tokens (completions `echo` + `logprobs`).
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    # (token id, bias) pairs added to the raw logits before sampling (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Guided decoding: only tokens the grammar allows are sampled, and the sequence ends
    # when the grammar is complete.
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class EngineRequest(msgspec.Struct, tag=True, frozen=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    lora_name: str | None = None  # None = the base model
    # This request's own latency targets; None = the engine's ttft_slo_ms / tpot_slo_ms.
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    # Seconds to keep its KV cached after it finishes (an agent's next turn), at most the
    # engine's max_kv_ttl_s; None = freed at once (still reusable until evicted).
    kv_ttl_s: float | None = None


class LoadAdapter(msgspec.Struct, tag=True, frozen=True):
    op_id: int
    name: str
    path: str


class UnloadAdapter(msgspec.Struct, tag=True, frozen=True):
    op_id: int
    name: str


class FinetuneExample(msgspec.Struct, frozen=True):
    token_ids: list[int]
    target: list[bool]  # target[t]: token t is trained on


class FinetuneSettings(msgspec.Struct, frozen=True):
    n_epochs: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool
    seed: int
    checkpoint_every_steps: int


class StartFinetune(msgspec.Struct, tag=True, frozen=True):
    """Train a LoRA adapter; checkpoints go to <output_dir>/checkpoints/step-<n>, the
    result to <output_dir>/final. `resume`: continue from the newest checkpoint there.
    `validation`: examples scored (never trained on) at checkpoint steps and the last."""

    job_id: str
    examples: list[FinetuneExample]
    settings: FinetuneSettings
    output_dir: str
    base_model: str
    resume: bool = False
    validation: list[FinetuneExample] = []


class ControlFinetune(msgspec.Struct, tag=True, frozen=True):
    job_id: str
    action: FinetuneAction


class AdapterOpDone(msgspec.Struct, tag=True, frozen=True):
    """Answer to LoadAdapter / UnloadAdapter; `error` and the setting it concerns when it failed."""

    op_id: int
    error: str | None = None
    param: str | None = None


class AbortRequests(msgspec.Struct, tag=True, frozen=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    pass


# A token's logprob and the top alternatives: (sampled_logprob, [(token_id, logprob), ...]).
TokenLogprobs = tuple[float, list[tuple[int, float]]]


class RequestOutput(msgspec.Struct, frozen=True):
    """What one request gained in one iteration."""

    request_id: str
    new_token_ids: list[int]
    # One entry per new token when logprobs were asked for.
    logprobs: list[TokenLogprobs] | None = None
    # Sent once, with the first output, when prompt logprobs were asked for; the
    # first prompt token has none, so the list has len(prompt) - 1 entries.
    prompt_logprobs: list[TokenLogprobs] | None = None
    # "stop" (EOS or stop token), "length" (max_tokens or context), "abort",
    # "error" (the request could not run; `error` says why).
    finish_reason: str | None = None
    error: str | None = None
    # The token id that stopped the request, when a stop token did.
    stop_token_id: int | None = None
    # Seconds from arrival to first being scheduled, and prompt tokens read from the
    # prefix cache; both sent with the first output.
    queued_seconds: float | None = None
    cached_tokens: int | None = None
    # Energy attributed to the request so far (None without a power device).
    energy_joules: float | None = None


class IterationStats(msgspec.Struct, frozen=True):
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    num_preemptions: int  # cumulative
    iteration_seconds: float
    num_batched_tokens: int
    # Per adapter name: sequences running / waiting (adapters with none are left out).
    lora_running: dict[str, int] = {}
    lora_waiting: dict[str, int] = {}
    # Waiting sequences whose adapter has no compute slot yet.
    num_waiting_for_lora_slot: int = 0
    max_loras: int = 0
    # Prefix cache, cumulative: prompt tokens looked up and found cached (vLLM's
    # meaning), cached blocks evicted, pins made, refused (bound reached) and expired; blocks pinned now.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_evictions: int = 0
    kv_pins: int = 0
    kv_pins_refused: int = 0
    kv_pin_expiries: int = 0
    kv_pinned_blocks: int = 0
    # Finetuning work done in this iteration, and the latency model's view of it.
    finetune_forward_tokens: int = 0
    finetune_backward_layer_tokens: int = 0
    finetune_loss_tokens: int = 0  # target tokens through the loss head
    predicted_seconds: float = 0.0
    # The time budget of an iteration that runs inference (the TPOT SLO paced per
    # request, see tpot_pacer.py); finetuning fills it. None without inference.
    budget_seconds: float | None = None
    latency_model_error: float | None = None  # mean relative error, recent iterations
    # The iteration's inference tokens, and its backward work in whole-model tokens
    # (layer-tokens / layers).
    decode_tokens: int = 0
    prefill_tokens: int = 0
    finetune_backward_tokens: float = 0.0
    # Power (None without a power device): this iteration's energy and its finetuning
    # share, the SM clock it ran at, the governor's target, board power.
    energy_joules: float | None = None
    finetune_energy_joules: float | None = None
    sm_clock_mhz: int | None = None
    target_sm_clock_mhz: int | None = None
    power_watts: float | None = None


class FinetuneStep(msgspec.Struct, frozen=True):
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    tokens_trained: int
    tokens_per_second: float
    energy_joules: float | None = None  # the job's energy so far (None without a power device)
    valid_loss: float | None = None  # mean token loss of the validation set (only when it was scored)


class FinetuneReport(msgspec.Struct, frozen=True):
    """What a job did since its last report."""

    job_id: str
    status: FinetuneStatus
    steps: list[FinetuneStep] = []
    checkpoints: list[tuple[int, str]] = []  # (step, directory)
    final_path: str | None = None
    error: str | None = None


class EngineOutputs(msgspec.Struct, tag=True, frozen=True):
    outputs: list[RequestOutput]
    stats: IterationStats | None = None
    finetune: list[FinetuneReport] = []


class EngineReady(msgspec.Struct, tag=True, frozen=True):
    """First frame the engine sends: what the server needs to validate requests."""

    max_model_len: int
    num_kv_blocks: int
    block_size: int
    dtype: str
    # The power device watched (None: none) and the governor's mode.
    power_device: str | None = None
    power_mode: str = "off"


class EngineFailed(msgspec.Struct, tag=True, frozen=True):
    """The engine could not start (bad model, out of memory); `message` says why."""

    message: str


ServerToEngine = (
    EngineRequest | AbortRequests | LoadAdapter | UnloadAdapter | StartFinetune | ControlFinetune | Shutdown
)
EngineToServer = EngineReady | EngineFailed | EngineOutputs | AdapterOpDone
