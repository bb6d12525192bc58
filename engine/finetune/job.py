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

The job's tensors (parameters, optimizer, kept activations, backward state) live in
its `JobShard` (job_shard.py), one per rank under tensor parallelism; this class
decides what they do and calls every operation through `self.shards`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.finetune.backward_costs import BackwardCosts
from engine.finetune.backward_work import BackwardAllowance, BackwardWork
from engine.finetune.job_shard import Backward, JobShard, JobShards, OptimizerSettings, longest_sequence
from engine.finetune.lora_params import LoRAConfig, TrainableLoRA
from engine.lora.layout import LoRALayout
from engine.messages import SamplingParams
from engine.model.llama import LlamaForCausalLM
from engine.parallel.tensor_parallel import TensorParallel
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


class TrainingSequence(Sequence):
    """A sequence the scheduler forwards like a prefill; it is never sampled from."""

    def __init__(self, job: FinetuneJob, example: TrainingExample, name: str):
        super().__init__(f"{job.job_id}/{name}", example.token_ids, SamplingParams(max_tokens=1), 0.0)
        self.job = job
        self.example = example

    def restart_forward(self) -> None:
        """Preempted mid-forward: the KV cache is gone, so the activations go too."""
        self.num_computed_tokens = 0
        self.job.shards.run("drop", self.request_id)


class ValidationSequence(TrainingSequence):
    """A validation example's forward: scored by the loss head, never trained on."""


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
    # Tensor parallelism: this rank's place and how operations reach the other ranks'
    # shards (engine/parallel/workers.py); None on one device.
    tensor_parallel: TensorParallel | None = None
    send: Callable[[tuple], None] | None = None

    def __post_init__(self) -> None:
        hp = self.hyperparameters
        self.order = epoch_order(len(self.examples), hp.n_epochs, self.seed)
        self.total_steps = math.ceil(len(self.order) / hp.batch_size)
        shard_args = (self.layout, self.lora_config, self.seed,
                      OptimizerSettings(hp.learning_rate, hp.betas, hp.eps, hp.weight_decay, hp.warmup_steps,
                                        self.total_steps),
                      longest_sequence(self.examples, self.validation))
        if self.send is not None:
            self.send((self.job_id, "create", shard_args))
        self.shards = JobShards(self.job_id, JobShard(self.model, *shard_args, self.tensor_parallel), self.send)
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
        self.backward: TrainingSequence | None = None  # the sequence whose backward runs
        # Forwards that finished while an earlier sequence's backward still ran, in order.
        self.ready: deque[TrainingSequence] = deque()
        self._batch_loss = 0.0
        self._batch_started = time.perf_counter()
        # The event of the step being validated, held back until its `valid_loss` is known.
        self._unvalidated: StepEvent | None = None
        self._valid_scored = 0  # validation examples scored in this pass
        self._valid_loss = 0.0  # their summed token loss
        self._valid_targets = max(1, sum(e.num_targets for e in self.validation))

    @property
    def lora(self) -> TrainableLoRA:
        """This rank's share of the trainable adapter (the whole one on one device)."""
        return self.shards.local.lora

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.shards.local.optimizer

    @property
    def backward_state(self) -> Backward | None:
        """How far the running backward has come."""
        return None if self.backward is None else self.shards.local.backwards[self.backward.request_id]

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
            **self.shards.run("trainer_state"),
            "step": self.step,
            "position": min(self.step * self.hyperparameters.batch_size, len(self.order)),
            "tokens_trained": tokens_trained,
            "energy_joules": energy_joules,
        }

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The whole adapter by PEFT keys (views of the live parameters on one device)."""
        return self.shards.run("peft_state")

    def load_trainer_state(self, state: dict) -> None:
        self.shards.run("load_trainer_state", state)
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

    def keep(self, seq: TrainingSequence, per_layer: list[torch.Tensor]) -> None:
        """A forward chunk's layer inputs (every rank keeps its own: workers.py)."""
        self.shards.local.keep(seq.request_id, per_layer)

    def forward_finished(self, seq: TrainingSequence) -> None:
        self.forwarding.remove(seq)
        example = seq.example
        if isinstance(seq, ValidationSequence):
            self._score(self.shards.run("score", seq.request_id, example.token_ids, example.target))
            return
        self.shards.run("start_backward", seq.request_id, example.token_ids, example.target)
        if self.backward is None:
            self.backward = seq
        else:
            self.ready.append(seq)

    def forget(self) -> None:
        """The job is removed: its tensors go, on every rank."""
        for seq in [*self.forwarding, *([self.backward] if self.backward else []), *self.ready]:
            self.shards.run("drop", seq.request_id)
        self.shards.release()

    @property
    def pending_loss_tokens(self) -> int:
        """Target tokens of the running backward still to go through the loss head."""
        work = self.backward_state
        return work.pending_loss_tokens if work is not None else 0

    def backward_slice(self, allowance: BackwardAllowance, costs: BackwardCosts) -> BackwardWork:
        """Advance the backward by what `allowance` (this job's share) affords: loss head
        passes first, then layers once the loss head is done; each is timed into `costs`.
        The amounts are decided before they run, so every rank can run the same."""
        seq, work = self.backward, self.backward_state
        if seq is None:
            return BackwardWork()
        seconds = allowance.seconds
        loss = BackwardWork(loss_tokens=allowance.loss_tokens(seconds, work.pending_loss_tokens))
        if loss.loss_tokens:
            started = time.perf_counter()
            # The gradient is scaled to the batch's mean token loss.
            self._batch_loss += self.shards.run("loss_pass", seq.request_id, loss.loss_tokens,
                                                1.0 / self._batch_targets())
            costs.record_loss(time.perf_counter() - started, loss.loss_tokens)
            if seconds is not None:
                seconds -= allowance.seconds_for(loss)
        if work.pending_loss_tokens:
            return loss
        positions = work.num_positions
        max_layers = allowance.layers(seconds, allowance.max_layers, positions)
        layers = work.next_layer + 1 if max_layers is None else min(max_layers, work.next_layer + 1)
        if layers:
            for seconds in self.shards.run("recompute_layers", seq.request_id, layers):
                costs.record_layer(seconds, positions)
        if work.next_layer < 0:
            self._sequence_done(seq)
        return loss + BackwardWork(layer_tokens=layers * positions)

    def _sequence_done(self, seq: TrainingSequence) -> None:
        self.backward = self.ready.popleft() if self.ready else None
        self.position += 1
        self.tokens_trained += seq.example.num_targets
        if self.position == self._batch_bounds()[1]:
            self._optimizer_step()

    def _optimizer_step(self) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.shards.run("optimizer_step")
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

    def _score(self, loss: float) -> None:
        """Add a validation example's summed loss (no backward: only its value is used)."""
        self._valid_loss += loss
        self._valid_scored += 1
        if self._valid_scored == len(self.validation):
            self.events.append(dataclasses.replace(self._unvalidated, valid_loss=self._valid_loss / self._valid_targets))
            self._unvalidated = None
            self._valid_scored, self._valid_loss = 0, 0.0
            # The next batch's throughput counts its own training only.
            self._batch_started = time.perf_counter()
