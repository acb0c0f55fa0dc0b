"""Everything a vLLM worker process keeps between steps for SeqTopK, in one object (`WORKER`).

One per process, because vLLM gives its MoE layers and the custom routing op no other place to find us:
the traced graph calls `torch.ops.seqtopk.vllm_route(logits, index)`, and `index` looks the router up
here. The state is replaced, not accumulated: when a model's KV cache is set up, routers of any model
built before it in this process are dropped (`keep_routers`), and `attach` starts a fresh step source.
This module imports nothing else of seqtopk's vLLM adapter, so every other module can import it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field


@dataclass
class StepSource:
    """Where each step's layout is read from; set up with the KV cache (see worker.attach_state)."""

    runner: weakref.ref | None = None  # the model runner
    group: int | None = None  # index of the full-attention KV cache group whose block table we follow
    num_slots: int = 0  # rows of each layer's store (KV slots + one scratch row)
    prompt_lens: object = None  # [max_num_reqs] prompt length per batch row, on the device, refreshed each step
    last_context: object = None  # the forward context the cached step was read for
    last_step: object = None  # that step (one read per forward, shared by every layer)


@dataclass
class WorkerRegistry:
    routers: dict = field(default_factory=dict)  # index -> SeqTopKRouter, in build order
    next_index: int = 0
    source: StepSource = field(default_factory=StepSource)
    trace: list | None = None  # chosen ids per token, while a client traces (tests)
    memory: dict = field(default_factory=dict)  # bytes per token of routing state and KV cache, store sizes

    def add_router(self, router) -> int:
        """Register a router; returns the index the routing op will be called with."""
        index = self.next_index
        self.next_index += 1
        self.routers[index] = router
        return index

    def keep_routers(self, routers) -> None:
        """Keep only these routers (the current model's): earlier models' routers and stores are released."""
        keep = {id(r) for r in routers}
        self.routers = {i: r for i, r in self.routers.items() if id(r) in keep}

    def first_router(self):
        return next(iter(self.routers.values()), None)

    def attach(self, runner, group: int, num_slots: int, prompt_lens) -> None:
        self.source = StepSource(runner=weakref.ref(runner), group=group, num_slots=num_slots,
                                 prompt_lens=prompt_lens)


WORKER = WorkerRegistry()
