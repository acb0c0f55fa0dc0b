"""Everything a vLLM worker process keeps between steps for SeqTopK, in one object (`WORKER`).

One per process, because vLLM gives its MoE layers and the custom MoE op no other place to find us: the
traced graph calls `torch.ops.seqtopk.moe(hidden_states, logits, index)`, and `index` looks the router up
here. The state is replaced, not accumulated: when a model's KV cache is set up, routers of any model
built before it in this process are dropped (`keep_routers`), and `attach` starts a fresh step source.
This module imports nothing else of seqtopk's vLLM adapter, so every other module can import it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field


@dataclass
class StepSource:
    """Where each step's layout is read from; set up with the KV cache (see startup.attach_state)."""

    runner: weakref.ref | None = None  # the model runner
    group: int | None = None  # index of the full-attention KV cache group whose block table we follow
    num_slots: int = 0  # rows of each layer's store (KV slots + one scratch row)
    prompt_lens: object = None  # [max_num_reqs] prompt length per batch row, on the device, refreshed each step
    row_band: object = None  # [max_num_reqs] decode band of each batch row (BandSlots), refreshed each step
    bands: "BandSlots | None" = None
    rows_of: list | None = None  # the request of each batch row when prompt_lens and row_band were last written
    last_context: object = None  # the forward context the cached step was read for
    last_step: object = None  # that step (one read per forward, shared by every layer)


@dataclass
class BandSlots:
    """Which decode band (a row of every layer's band tensor) each request uses: assigned when a request first
    runs, kept while it lives (a preempted request keeps its band: its history comes back with it), released
    when it finishes. A band newly assigned is marked stale in every layer (the kernel rebuilds it from the
    store); a band that no longer matches its request's history is caught by the kernel either way."""

    capacity: int
    slot_of: dict = field(default_factory=dict)  # request id -> band
    free: list = field(default_factory=list)

    def __post_init__(self):
        self.free = list(range(self.capacity - 1, -1, -1))

    def assign(self, req_ids: list, stale: list) -> list[int]:
        """Bands of this batch's requests (new ones get a band; `stale` collects bands to mark stale). When every
        band is held, bands of requests not in this batch are taken back, oldest first."""
        running = set(req_ids)
        out = []
        for req in req_ids:
            band = self.slot_of.get(req)
            if band is None:
                if not self.free:
                    idle = next((r for r in self.slot_of if r not in running), None)
                    if idle is None:
                        out.append(-1)  # more rows than bands: this row walks its history
                        continue
                    self.free.append(self.slot_of.pop(idle))
                band = self.slot_of[req] = self.free.pop()
                stale.append(band)
            out.append(band)
        return out

    def release(self, req_ids) -> None:
        for req in req_ids:
            band = self.slot_of.pop(req, None)
            if band is not None:
                self.free.append(band)


@dataclass
class WorkerRegistry:
    routers: dict = field(default_factory=dict)  # index -> SeqTopKRouter, in build order
    next_index: int = 0
    source: StepSource = field(default_factory=StepSource)
    trace: list | None = None  # chosen ids per token, while a client traces (tests)
    memory: dict = field(default_factory=dict)  # bytes per token of routing state and KV cache, store sizes
    generation: int = 0  # counts changes to the routers or the step source (what per-step caches are keyed by)

    def add_router(self, router) -> int:
        """Register a router; returns the index the routing op will be called with."""
        index = self.next_index
        self.next_index += 1
        self.routers[index] = router
        self.generation += 1
        return index

    def keep_routers(self, routers) -> None:
        """Keep only these routers (the current model's): earlier models' routers and stores are released."""
        keep = {id(r) for r in routers}
        self.routers = {i: r for i, r in self.routers.items() if id(r) in keep}
        self.generation += 1

    def first_router(self):
        return next(iter(self.routers.values()), None)

    def attach(self, runner, group: int, num_slots: int, prompt_lens, row_band=None, bands: BandSlots | None = None) -> None:
        self.source = StepSource(runner=weakref.ref(runner), group=group, num_slots=num_slots,
                                 prompt_lens=prompt_lens, row_band=row_band, bands=bands)
        self.generation += 1


WORKER = WorkerRegistry()
