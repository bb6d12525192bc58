"""Which adapters exist, which are in host memory, which occupy a compute slot.

Three tiers, the way vLLM and S-LoRA keep them:
  registered  every adapter a request may name (name -> path), without limit;
  host        up to `max_cpu_loras` adapters read and validated, least recently used
              evicted first (an evicted one is read again from its path when needed);
  slots       `max_loras` adapters resident for compute (`LoRASlots`).

A sequence holds a reference to its adapter from arrival to finish (`acquire` /
`release`), so neither an unload nor host eviction can pull the weights from under a
queued request. It holds the adapter's slot while it is running (`activate` /
`deactivate`, called by the scheduler); a slot whose adapter has no running sequence
can be given to another adapter, least recently activated first.

Unloading an adapter removes its name at once (new requests get 404), and lets every
request that already uses it finish; its slot and memory are freed after the last one.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.lora.adapter import AdapterError, LoRAWeights, load_adapter
from engine.lora.backend import NativeLoRABackend
from engine.lora.layout import LoRALayout
from engine.lora.slots import LoRASlots
from engine.parallel.tensor_parallel import TensorParallel, read_lora_shard, shard_layout


# Versions of adapter weights, unique in the process: a prefix-cache block computed by
# one version never matches a sequence of another (an adapter reloaded under the same
# name, or a finetuning job's adapter after an optimizer step).
_weight_versions = itertools.count(1)


@dataclass(eq=False)
class AdapterEntry:
    name: str
    path: Path
    weights: LoRAWeights | None = None  # None while evicted from host memory
    slot: int | None = None
    num_requests: int = 0  # live sequences using it (waiting or running)
    num_running: int = 0  # of those, the ones holding its slot
    removed: bool = False
    last_activated: int = field(default=0)
    version: int = field(default_factory=lambda: next(_weight_versions))
    job_id: str | None = None  # a finetuning job's adapter: its weights come from the job


@dataclass(frozen=True)
class SlotLoad:
    """Under tensor parallelism, a slot the other ranks must rewrite with their own share:
    of the adapter in `path`, or of finetuning job `job_id`'s current weights."""

    slot: int
    path: str | None
    job_id: str | None


class LoRAManager:
    def __init__(
        self,
        layout: LoRALayout,
        max_loras: int,
        max_cpu_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: str,
        tensor_parallel: TensorParallel | None = None,
    ):
        """layout: the whole model's (adapters are checked against it); under
        `tensor_parallel` each adapter is sharded as it is read and the slots hold this
        rank's part."""
        if max_loras < 1 or max_cpu_loras < max_loras:
            raise ValueError(f"need 1 <= max_loras <= max_cpu_loras, got {max_loras} and {max_cpu_loras}")
        self.layout = layout
        self.tensor_parallel = tensor_parallel if tensor_parallel is not None and tensor_parallel.size > 1 else None
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.adapters: dict[str, AdapterEntry] = {}
        self._host: OrderedDict[int, AdapterEntry] = OrderedDict()  # id(entry) -> entry, LRU first
        self._slot_owner: list[AdapterEntry | None] = [None] * max_loras
        self._clock = itertools.count(1)
        # The model runner computes through this backend; its slot tensors are allocated
        # with the first adapter.
        compute_layout = layout if self.tensor_parallel is None else shard_layout(layout, self.tensor_parallel.size)
        self.backend = NativeLoRABackend(LoRASlots(compute_layout, max_loras, max_rank, dtype, device))
        # Under tensor parallelism: slots written since the other ranks last heard, for
        # them to load their own shards (engine/parallel/workers.py).
        self._slot_loads: list[SlotLoad] = []
        self.num_slot_loads = 0

    # -- registry ------------------------------------------------------------

    def add(self, name: str, path: Path) -> AdapterEntry:
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is already loaded", param="lora_name")
        weights = self._read(Path(path))
        entry = AdapterEntry(name, Path(path), weights)
        self.adapters[name] = entry
        self._cache_on_host(entry)
        return entry

    def add_trainable(self, name: str, weights: LoRAWeights, job_id: str) -> AdapterEntry:
        """A finetuning job's adapter: computed like any other, never selectable by name,
        held (never evicted from host) until the job releases it."""
        entry = AdapterEntry(name, Path(), weights, num_requests=1, job_id=job_id)
        self._cache_on_host(entry)
        return entry

    def refresh(self, entry: AdapterEntry, weights: LoRAWeights) -> None:
        """New weights after an optimizer step; a resident slot is rewritten in place."""
        entry.weights = weights
        entry.version = next(_weight_versions)
        if entry.slot is not None:
            self.backend.slots.write(entry.slot, weights)
            self._note_slot_load(entry)

    def remove(self, name: str) -> None:
        entry = self.adapters.pop(name, None)
        if entry is None:
            raise AdapterError(f"no adapter named {name!r} is loaded", param="lora_name")
        entry.removed = True
        if entry.num_requests == 0:
            self._drop(entry)

    def _read(self, path: Path) -> LoRAWeights:
        if self.tensor_parallel is None:
            return load_adapter(path, self.layout, self.max_rank, self.dtype)
        return read_lora_shard(path, self.layout, self.max_rank, self.dtype, self.tensor_parallel)

    # -- per request ---------------------------------------------------------

    def acquire(self, name: str) -> AdapterEntry:
        """A new request uses adapter `name`: make sure its weights are on the host."""
        entry = self.adapters.get(name)
        if entry is None:
            raise AdapterError(f"no adapter named {name!r} is loaded", param="model")
        if entry.weights is None:
            entry.weights = self._read(entry.path)
        entry.num_requests += 1
        self._cache_on_host(entry)
        return entry

    def release(self, entry: AdapterEntry) -> None:
        entry.num_requests -= 1
        if entry.removed and entry.num_requests == 0:
            self._drop(entry)

    def release_trainable(self, entry: AdapterEntry) -> None:
        entry.removed = True
        self.release(entry)

    # -- slots (called by the scheduler) --------------------------------------

    def activate(self, entry: AdapterEntry) -> bool:
        """Give `entry` a compute slot for one more running sequence; False if every slot is busy."""
        if entry.slot is None:
            slot = self._free_slot()
            if slot is None:
                return False
            self._load_slot(entry, slot)
        entry.num_running += 1
        entry.last_activated = next(self._clock)
        return True

    def deactivate(self, entry: AdapterEntry) -> None:
        entry.num_running -= 1

    def _free_slot(self) -> int | None:
        empty = [s for s, owner in enumerate(self._slot_owner) if owner is None]
        if empty:
            return empty[0]
        idle = [(owner.last_activated, s) for s, owner in enumerate(self._slot_owner) if owner.num_running == 0]
        return min(idle)[1] if idle else None

    def _load_slot(self, entry: AdapterEntry, slot: int) -> None:
        previous = self._slot_owner[slot]
        if previous is not None:
            previous.slot = None
        assert entry.weights is not None, "acquire() keeps a live adapter's weights on the host"
        self.backend.slots.write(slot, entry.weights)
        self._slot_owner[slot] = entry
        entry.slot = slot
        self._note_slot_load(entry)
        self.num_slot_loads += 1

    def _note_slot_load(self, entry: AdapterEntry) -> None:
        if self.tensor_parallel is not None:
            path = None if entry.job_id is not None else str(entry.path)
            self._slot_loads.append(SlotLoad(entry.slot, path, entry.job_id))

    def take_slot_loads(self) -> list[SlotLoad]:
        loads, self._slot_loads = self._slot_loads, []
        return loads

    # -- memory ----------------------------------------------------------------

    def _cache_on_host(self, entry: AdapterEntry) -> None:
        self._host[id(entry)] = entry
        self._host.move_to_end(id(entry))
        # Over the limit: drop the least recently used that no request holds.
        for key, cached in list(self._host.items()):
            if len(self._host) <= self.max_cpu_loras:
                break
            if cached.num_requests == 0 and cached is not entry:
                cached.weights = None
                del self._host[key]

    def _drop(self, entry: AdapterEntry) -> None:
        self._host.pop(id(entry), None)
        entry.weights = None
        if entry.slot is not None:
            self._slot_owner[entry.slot] = None
            # Nothing to load there any more (a finetuning job's weights are gone with it).
            self._slot_loads = [load for load in self._slot_loads if load.slot != entry.slot]
            entry.slot = None

    @property
    def num_resident(self) -> int:
        return sum(owner is not None for owner in self._slot_owner)
