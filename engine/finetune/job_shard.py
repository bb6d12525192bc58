"""A finetuning job's tensors on one rank, and the operations that change them.

A `FinetuneJob` is bookkeeping (data order, steps, events, validation) around this: the
trainable LoRA parameters, their optimizer, the layer inputs a training sequence's
forward kept, and the state of its backward. On one device there is one `JobShard`.
Under tensor parallelism every rank holds one, with its share of the parameters (split
like the weights they adapt, engine/parallel/tensor_parallel.py) and of their optimizer
state, while the bookkeeping stays on rank 0. Rank 0 runs every operation on all ranks
(`JobShards.run` sends it to the others first, engine/parallel/workers.py): the
collectives inside (the model's all-reduces, the loss head's gather, the gradient sums
of replicated factors) pair up because every rank runs the same operations in the same
order. Checkpoints gather the shares into whole tensors, so they are ordinary PEFT
adapters and trainer states whatever the size they were trained at.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.finetune.lora_params import LoRAConfig, TrainableLoRA
from engine.finetune.recompute import layer_forward, loss_sum
from engine.lora.layout import LoRALayout
from engine.model.llama import LlamaForCausalLM
from engine.model.rope import rope_tables
from engine.parallel.tensor_parallel import TensorParallel, share


def linear_schedule(warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


@dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    warmup_steps: int
    total_steps: int


def loss_targets(token_ids: list[int], target: list[bool]) -> torch.Tensor:
    """Per position, the next token to predict, or -100 where it is not trained on; [T]."""
    return torch.tensor([token_ids[t + 1] if target[t + 1] else -100 for t in range(len(token_ids) - 1)] + [-100])


@dataclass
class Backward:
    """The backward of one training sequence, as far as it has come."""

    num_positions: int
    inputs: list[torch.Tensor | None]  # per layer + final, [T, hidden]; dropped once used
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


class JobShard:
    def __init__(self, model: LlamaForCausalLM, layout: LoRALayout, lora_config: LoRAConfig, seed: int,
                 optimizer: OptimizerSettings, max_positions: int, tensor_parallel: TensorParallel | None = None):
        """layout: the whole model's; max_positions: the longest sequence the job trains on."""
        self.model = model
        self.device = model.norm.weight.device
        # Initialised on the CPU from the seed (the same values on any device), then moved.
        self.lora = TrainableLoRA(layout, lora_config, seed, tensor_parallel).to(self.device)
        self.tp = self.lora.tensor_parallel
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=optimizer.learning_rate, betas=optimizer.betas,
                                           eps=optimizer.eps, weight_decay=optimizer.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(optimizer.warmup_steps, optimizer.total_steps))
        dtype = model.embed_tokens.weight.dtype
        cos, sin = rope_tables(model.config, model.head_dim, max_positions)  # [max_positions, head_dim]
        self.cos, self.sin = cos.to(self.device, dtype), sin.to(self.device, dtype)
        # Per sequence in its forward: per layer (and the last layer's output), the
        # chunks' input hidden states, each [chunk_tokens, hidden].
        self.saved: dict[str, list[list[torch.Tensor]]] = {}
        self.backwards: dict[str, Backward] = {}

    # -- forward ---------------------------------------------------------------

    def keep(self, seq_id: str, per_layer: list[torch.Tensor]) -> None:
        """A forward chunk's layer inputs, [chunk_tokens, hidden] each."""
        saved = self.saved.setdefault(seq_id, [[] for _ in per_layer])
        for chunks, tensor in zip(saved, per_layer):
            chunks.append(tensor)

    def drop(self, seq_id: str) -> None:
        """Forget a sequence (its forward restarts, or the job ends)."""
        self.saved.pop(seq_id, None)
        self.backwards.pop(seq_id, None)

    def start_backward(self, seq_id: str, token_ids: list[int], target: list[bool]) -> None:
        inputs = [torch.cat(chunks) for chunks in self.saved.pop(seq_id)]  # per layer + final, [T, hidden]
        targets = loss_targets(token_ids, target).to(self.device)  # [T]
        positions = (targets != -100).nonzero().squeeze(1)
        self.backwards[seq_id] = Backward(len(token_ids), inputs, positions, targets[positions],
                                          grad=torch.zeros_like(inputs[-1]), next_layer=len(inputs) - 2)

    def score(self, seq_id: str, token_ids: list[int], target: list[bool]) -> float:
        """Summed token loss of a validation sequence's forward (no backward)."""
        hidden = torch.cat(self.saved.pop(seq_id)[-1])  # the last layer's output, [T, hidden]
        targets = loss_targets(token_ids, target).to(self.device)  # [T]
        scored = targets != -100
        return loss_sum(self.model, hidden[scored], targets[scored])[0]

    # -- backward --------------------------------------------------------------

    def loss_pass(self, seq_id: str, num_tokens: int, scale: float) -> float:
        """The loss head over the sequence's next `num_tokens` target positions; their
        gradient, times `scale`, adds into the top layer's output gradient. Returns their
        summed loss."""
        work = self.backwards[seq_id]
        rows = slice(work.loss_done, work.loss_done + num_tokens)
        positions = work.loss_positions[rows]
        loss, grad = loss_sum(self.model, work.inputs[-1][positions], work.loss_targets[rows])
        work.grad.index_add_(0, positions, grad, alpha=scale)
        work.loss_done += num_tokens
        return loss

    def recompute_layers(self, seq_id: str, count: int) -> list[float]:
        """Backpropagate through the next `count` layers from the top (the loss head done);
        returns the seconds each took. The sequence is forgotten after layer 0."""
        work = self.backwards[seq_id]
        positions = work.num_positions
        cos, sin = self.cos[:positions], self.sin[:positions]
        seconds = []
        with torch.enable_grad():
            for _ in range(count):
                started = time.perf_counter()
                x = work.inputs[work.next_layer].clone().requires_grad_(True)
                layer_forward(self.model, work.next_layer, x, cos, sin, self.lora).backward(work.grad)
                work.grad = x.grad
                work.inputs[work.next_layer + 1] = None  # no longer needed
                work.next_layer -= 1
                seconds.append(time.perf_counter() - started)
        if work.next_layer < 0:
            del self.backwards[seq_id]
        return seconds

    def optimizer_step(self) -> None:
        """One AdamW step on the accumulated gradients. Each rank's gradient of a replicated
        factor holds only its own part of the sum, so those are summed first (and then
        every rank steps them alike)."""
        if self.tp is not None:
            for name, param in self.lora.named_parameters():
                if self.lora.split_dims[name] is None and param.grad is not None:
                    dist.all_reduce(param.grad, group=self.tp.group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()

    # -- state -----------------------------------------------------------------

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The whole adapter, PEFT keys -> A [r, in] / B [out, r]: detached views of the
        live parameters on one device, gathered copies under tensor parallelism."""
        state = self.lora.peft_state_dict(copy=False)
        if self.tp is None:
            return state
        dims = {key: self.lora.split_dims[name] for key, name in self.lora.peft_names().items()}
        return {key: self._gathered(t, dims[key]) for key, t in state.items()}

    def trainer_state(self) -> dict:
        """Parameters, optimizer and schedule state, whole (gathered over the ranks)."""
        optimizer = self.optimizer.state_dict()
        if self.tp is not None:
            dims = self._optimizer_dims()
            optimizer["state"] = {
                index: {k: self._gathered(v, dims[index]) if v.dim() else v for k, v in entry.items()}
                for index, entry in optimizer["state"].items()
            }
        return {
            "lora": {name: self._gathered(t, self.lora.split_dims[name]) for name, t in self.lora.state_dict().items()},
            "optimizer": optimizer,
            "lr_schedule": self.lr_schedule.state_dict(),
        }

    def load_trainer_state(self, state: dict) -> None:
        """Continue from a whole trainer state (as trainer_state returns), taking this rank's share."""
        lora, optimizer = state["lora"], state["optimizer"]
        if self.tp is not None:
            dims = self._optimizer_dims()
            lora = {name: self._share(t, self.lora.split_dims[name]) for name, t in lora.items()}
            optimizer = dict(optimizer, state={
                int(index): {k: self._share(v, dims[int(index)]) if v.dim() else v for k, v in entry.items()}
                for index, entry in optimizer["state"].items()
            })
        self.lora.load_state_dict(lora)
        self.optimizer.load_state_dict(optimizer)
        self.lr_schedule.load_state_dict(state["lr_schedule"])

    def _optimizer_dims(self) -> dict[int, int | None]:
        """Optimizer parameter index -> its split dim (the optimizer holds lora.parameters() in order)."""
        return {index: self.lora.split_dims[name] for index, (name, _) in enumerate(self.lora.named_parameters())}

    def _gathered(self, t: torch.Tensor, dim: int | None) -> torch.Tensor:
        if self.tp is None or dim is None:
            return t
        parts = [torch.empty_like(t) for _ in range(self.tp.size)]
        dist.all_gather(parts, t.contiguous(), group=self.tp.group)
        return torch.cat(parts, dim=dim)

    def _share(self, t: torch.Tensor, dim: int | None) -> torch.Tensor:
        return t if dim is None else share(t, dim, self.tp)


class JobShards:
    """Rank 0's handle on a job's shards: `local` (its own) and, under tensor parallelism,
    `send`, which hands an operation to the other ranks before rank 0 runs it."""

    def __init__(self, job_id: str, local: JobShard, send: Callable[[tuple], None] | None):
        self.job_id = job_id
        self.local = local
        self.send = send

    def run(self, operation: str, *args):
        if self.send is not None:
            self.send((self.job_id, operation, args))
        return getattr(self.local, operation)(*args)

    def release(self) -> None:
        """The job is gone: the other ranks drop their shards."""
        if self.send is not None:
            self.send((self.job_id, "release", ()))


def longest_sequence(*example_sets) -> int:
    """The longest token sequence among the examples (at least 1)."""
    return max((len(e.token_ids) for examples in example_sets for e in examples), default=1)
