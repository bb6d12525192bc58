"""One finetuning job: its data order, adapter, optimizer, and the state of its work.

A job trains its `TrainableLoRA` on tokenized examples, one training sequence at a
time: the sequence's forward runs in token chunks inside the engine's flat batch
(scheduled by the scheduler like a prefill, through the job's adapter slot), then its
backward runs in slices that fit the iteration (`backward_slice`): the loss head over
its target tokens, then a few layers per iteration from the top. Gradients
accumulate over `batch_size` sequences; then AdamW steps, with a linear schedule
after warmup. The loss of a batch is the summed token cross-entropy over its target
tokens divided by their number, as in ordinary (PEFT) training of the same batch.

With validation examples, every `validate_every` steps and at the last step the job
scores them with that step's weights before training goes on: each is forwarded like a
training sequence and only the loss head runs on it. The step's event waits for that
score (`valid_loss`, reduced like the training loss), so events stay in step order.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.finetune.backward_costs import BackwardCosts
from engine.finetune.backward_work import BackwardAllowance, BackwardWork
from engine.finetune.lora_params import LoRAConfig, TrainableLoRA
from engine.finetune.recompute import layer_forward, loss_sum
from engine.lora.layout import LoRALayout
from engine.messages import SamplingParams
from engine.model.llama import LlamaForCausalLM
from engine.sequence import Sequence

# Training sequences of a job forwarded ahead of its backward at most (see next_sequence).
FORWARD_AHEAD = 2


@dataclass(frozen=True)
class TrainingExample:
    token_ids: list[int]
    # target[t]: token t is trained on (predicted from tokens < t); target[0] is ignored.
    target: list[bool]

    @property
    def num_targets(self) -> int:
        return sum(self.target[1:])


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class StepEvent:
    step: int
    total_steps: int
    loss: float  # mean token loss of the batch
    learning_rate: float  # the rate this step used
    tokens_trained: int  # cumulative target tokens
    tokens_per_second: float
    energy_joules: float | None = None  # the job's energy so far (None without a power device)
    valid_loss: float | None = None  # mean token loss of the validation set, on the steps it is scored


def epoch_order(num_examples: int, n_epochs: int, seed: int) -> list[int]:
    """Example indices in training order: every epoch a fresh seeded shuffle."""
    order = []
    for epoch in range(n_epochs):
        indices = list(range(num_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(indices)
        order += indices
    return order


def linear_schedule(warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def loss_targets(example: TrainingExample) -> torch.Tensor:
    """Per position, the next token to predict, or -100 where it is not trained on; [T]."""
    ids = example.token_ids
    return torch.tensor([ids[t + 1] if example.target[t + 1] else -100 for t in range(len(ids) - 1)] + [-100])


class TrainingSequence(Sequence):
    """A sequence the scheduler forwards like a prefill; it is never sampled from."""

    def __init__(self, job: FinetuneJob, example: TrainingExample, name: str):
        super().__init__(f"{job.job_id}/{name}", example.token_ids, SamplingParams(max_tokens=1), 0.0)
        self.job = job
        self.example = example
        # Per layer (and the last layer's output): input hidden states of the
        # computed tokens, chunk by chunk, each [chunk_tokens, hidden].
        self.saved: list[list[torch.Tensor]] = [[] for _ in range(job.model.config.num_hidden_layers + 1)]

    def restart_forward(self) -> None:
        """Preempted mid-forward: the KV cache is gone, so the activations go too."""
        self.num_computed_tokens = 0
        self.saved = [[] for _ in self.saved]


class ValidationSequence(TrainingSequence):
    """A validation example's forward: scored by the loss head, never trained on."""


@dataclass
class _Backward:
    seq: TrainingSequence
    inputs: list[torch.Tensor]  # per layer + final, [T, hidden]
    loss_positions: torch.Tensor  # positions that carry a target, [n]
    loss_targets: torch.Tensor  # the token each of them predicts, [n]
    # d loss / d (input of the next layer to do), [T, hidden]: the loss head's passes
    # add into it first, then each recomputed layer replaces it.
    grad: torch.Tensor
    next_layer: int  # the layer to recompute next
    loss_done: int = 0  # loss_positions through the loss head so far

    @property
    def pending_loss_tokens(self) -> int:
        return len(self.loss_positions) - self.loss_done

    @classmethod
    def start(cls, seq: TrainingSequence, inputs: list[torch.Tensor]) -> _Backward:
        targets = loss_targets(seq.example)  # [T]
        positions = (targets != -100).nonzero().squeeze(1)
        return cls(seq, inputs, positions, targets[positions], grad=torch.zeros_like(inputs[-1]),
                   next_layer=len(inputs) - 2)


@dataclass
class FinetuneJob:
    job_id: str
    model: LlamaForCausalLM
    layout: LoRALayout
    examples: list[TrainingExample]
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    lora_config: LoRAConfig = field(default_factory=LoRAConfig)
    seed: int = 0
    validation: list[TrainingExample] = field(default_factory=list)
    validate_every: int = 1  # steps between validation passes (the last step always has one)

    def __post_init__(self) -> None:
        hp = self.hyperparameters
        self.lora = TrainableLoRA(self.layout, self.lora_config, self.seed)
        self.order = epoch_order(len(self.examples), hp.n_epochs, self.seed)
        self.total_steps = math.ceil(len(self.order) / hp.batch_size)
        self.optimizer = torch.optim.AdamW(
            self.lora.parameters(), lr=hp.learning_rate, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(hp.warmup_steps, self.total_steps)
        )
        self.position = 0  # index into `order` of the next sequence to finish its backward
        self.started = 0  # index into `order` of the next sequence to start its forward
        self.step = 0
        self.tokens_trained = 0
        self.events: list[StepEvent] = []
        # Energy of the iterations' finetuning shares attributed to this job (the engine
        # adds to it when a power device is watched).
        self.energy_joules: float | None = None
        # (tokens_trained, energy_joules) as the last optimizer step left them.
        self._at_last_step: tuple[int, float | None] = (0, None)
        self.forwarding: list[TrainingSequence] = []  # in the order they started
        self.backward: _Backward | None = None
        # Forwards that finished while an earlier sequence's backward still ran, in order.
        self.ready: deque[_Backward] = deque()
        self._batch_loss = 0.0
        self._batch_started = time.perf_counter()
        # The event of the step being validated, held back until its `valid_loss` is known.
        self._unvalidated: StepEvent | None = None
        self._valid_scored = 0  # validation examples scored in this pass
        self._valid_loss = 0.0  # their summed token loss
        self._valid_targets = max(1, sum(e.num_targets for e in self.validation))

    @property
    def validating(self) -> bool:
        return self._unvalidated is not None

    @property
    def done(self) -> bool:
        return self.step == self.total_steps and not self.validating

    def trainer_state(self) -> dict:
        """Everything to continue training from the last step boundary (see checkpoint.py);
        taken once the step's validation is done, so a resumed job never owes one. Taken
        between two steps (the engine is stopping), it is still the boundary's: weights and
        optimizer change only at a step, and the next batch's sequences that finished
        their backward since are trained again (their gradients are not kept)."""
        tokens_trained, energy_joules = self._at_last_step
        return {
            "lora": self.lora.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "step": self.step,
            "position": min(self.step * self.hyperparameters.batch_size, len(self.order)),
            "tokens_trained": tokens_trained,
            "energy_joules": energy_joules,
        }

    def load_trainer_state(self, state: dict) -> None:
        self.lora.load_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step, self.position, self.tokens_trained = state["step"], state["position"], state["tokens_trained"]
        self.started = self.position
        self.energy_joules = state.get("energy_joules")  # absent in checkpoints without a power device
        self._at_last_step = (self.tokens_trained, self.energy_joules)

    def _batch_bounds(self) -> tuple[int, int]:
        start = self.step * self.hyperparameters.batch_size
        return start, min(start + self.hyperparameters.batch_size, len(self.order))

    def _batch_targets(self) -> int:
        start, end = self._batch_bounds()
        return max(1, sum(self.examples[i].num_targets for i in self.order[start:end]))

    def next_sequence(self) -> TrainingSequence | None:
        """The sequence to forward next, or None: the pending validation first (one example
        at a time), so training resumes only after it.

        Training forwards run ahead of the backward, up to FORWARD_AHEAD sequences of the
        same optimizer batch: no weight update falls between them, so each forward sees
        the weights it would see after the backwards before it. Its tokens then share an
        iteration's weight reads with the decodes, which a backward slice cannot. Two
        ahead rather than one: a batch's first forward has no backward to run beside it,
        and with one sequence in flight those iterations carried 60-110 finetuning
        tokens and nothing else for the job (a fifth of the co-served iterations at
        2.9 req/s on the 2-core machine); a second forward fills them.
        """
        if self.done:
            return None
        if self.validating:  # set by an optimizer step, so no backward is in flight
            if self.forwarding:
                return None
            index = self._valid_scored
            seq = ValidationSequence(self, self.validation[index], f"val{self.step}-{index}")
        else:
            if len(self.forwarding) + len(self.ready) >= FORWARD_AHEAD:
                return None
            if self.started >= self._batch_bounds()[1]:
                return None  # the next sequence waits for this batch's optimizer step
            seq = TrainingSequence(self, self.examples[self.order[self.started]], f"seq{self.started}")
            self.started += 1
        self.forwarding.append(seq)
        return seq

    def forward_finished(self, seq: TrainingSequence) -> None:
        self.forwarding.remove(seq)
        if isinstance(seq, ValidationSequence):
            self._score(seq)
            return
        inputs = [torch.cat(chunks) for chunks in seq.saved]  # per layer + final, [T, hidden]
        seq.saved = []
        if self.backward is None:
            self.backward = _Backward.start(seq, inputs)
        else:
            self.ready.append(_Backward.start(seq, inputs))

    @property
    def pending_loss_tokens(self) -> int:
        """Target tokens of the running backward still to go through the loss head."""
        return self.backward.pending_loss_tokens if self.backward is not None else 0

    def backward_slice(
        self, allowance: BackwardAllowance, cos: torch.Tensor, sin: torch.Tensor, costs: BackwardCosts
    ) -> BackwardWork:
        """Advance the backward by what `allowance` (this job's share) affords: loss head
        passes first, then layers once the loss head is done; each is timed into `costs`."""
        work = self.backward
        if work is None:
            return BackwardWork()
        seconds = allowance.seconds
        loss = BackwardWork(loss_tokens=allowance.loss_tokens(seconds, work.pending_loss_tokens))
        if loss.loss_tokens:
            started = time.perf_counter()
            self._loss_pass(work, loss.loss_tokens)
            costs.record_loss(time.perf_counter() - started, loss.loss_tokens)
            if seconds is not None:
                seconds -= allowance.seconds_for(loss)
        if work.pending_loss_tokens:
            return loss
        positions = len(work.seq.example.token_ids)
        max_layers = allowance.layers(seconds, allowance.max_layers, positions)
        done = 0
        with torch.enable_grad():
            while (max_layers is None or done < max_layers) and work.next_layer >= 0:
                started = time.perf_counter()
                x = work.inputs[work.next_layer].clone().requires_grad_(True)
                y = layer_forward(self.model, work.next_layer, x, cos[:positions], sin[:positions], self.lora)
                y.backward(work.grad)
                work.grad = x.grad
                costs.record_layer(time.perf_counter() - started, positions)
                work.inputs[work.next_layer + 1] = None  # no longer needed
                work.next_layer -= 1
                done += 1
        if work.next_layer < 0:
            self._sequence_done(work.seq)
        return loss + BackwardWork(layer_tokens=done * positions)

    def _loss_pass(self, work: _Backward, num_tokens: int) -> None:
        """The loss head over the next `num_tokens` target positions; their gradient, scaled
        to the batch's mean token loss, adds into the top layer's output gradient."""
        rows = slice(work.loss_done, work.loss_done + num_tokens)
        positions = work.loss_positions[rows]
        loss, grad = loss_sum(self.model, work.inputs[-1][positions], work.loss_targets[rows])
        self._batch_loss += loss
        work.grad.index_add_(0, positions, grad, alpha=1.0 / self._batch_targets())
        work.loss_done += num_tokens

    def _sequence_done(self, seq: TrainingSequence) -> None:
        self.backward = self.ready.popleft() if self.ready else None
        self.position += 1
        self.tokens_trained += seq.example.num_targets
        if self.position == self._batch_bounds()[1]:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        elapsed = time.perf_counter() - self._batch_started
        start, end = self._batch_bounds()
        batch_tokens = sum(self.examples[i].num_targets for i in self.order[start:end])
        self.step += 1
        self._at_last_step = (self.tokens_trained, self.energy_joules)
        event = StepEvent(
            step=self.step,
            total_steps=self.total_steps,
            loss=self._batch_loss / max(1, batch_tokens),
            learning_rate=lr,
            tokens_trained=self.tokens_trained,
            tokens_per_second=batch_tokens / elapsed if elapsed > 0 else 0.0,
            energy_joules=self.energy_joules,
        )
        if self.validation and (self.step % self.validate_every == 0 or self.step == self.total_steps):
            self._unvalidated = event
        else:
            self.events.append(event)
        self._batch_loss = 0.0
        self._batch_started = time.perf_counter()

    def _score(self, seq: ValidationSequence) -> None:
        """Add a validation example's loss (no backward: only the loss value is used)."""
        hidden = torch.cat(seq.saved[-1])  # the last layer's output, [T, hidden]
        seq.saved = []
        targets = loss_targets(seq.example)  # [T]
        scored = targets != -100
        self._valid_loss += loss_sum(self.model, hidden[scored], targets[scored])[0]
        self._valid_scored += 1
        if self._valid_scored == len(self.validation):
            self.events.append(dataclasses.replace(self._unvalidated, valid_loss=self._valid_loss / self._valid_targets))
            self._unvalidated = None
            self._valid_scored, self._valid_loss = 0, 0.0
            # The next batch's throughput counts its own training only.
            self._batch_started = time.perf_counter()
