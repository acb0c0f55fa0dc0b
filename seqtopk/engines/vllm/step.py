"""Per-request routing state in vLLM: paged alongside the KV cache, so vLLM's own bookkeeping keys it.

Each MoE layer keeps the capped scores of every token it routed in a store with one row per KV-cache slot
(`num_blocks * block_size`, plus a scratch row for padding). A token's scores go to the slot its keys and
values go to (`slot_mapping`); a request's history is read back through its block table, up to its
context length. So the state of a request
- is created with its first token and grows with its KV cache, whatever row the request has in the batch;
- is released when vLLM frees the request's blocks (finished, aborted or preempted);
- continues across chunked prefill and decode steps (a chunk is routed against the history before it);
- is recomputed with the KV cache after preemption (recompute replays the same causal choices);
- is shared with prefix-cached blocks, whose scores are a function of the prefix under the causal rule
  (under prefill="sequence" the plugin switches prefix caching off).

Each step's layout (rows, contexts, slots, which tokens are prompt) is read once per forward from the
model runner's step buffers, with the block table and slot mapping of one full-attention KV cache group.
Which rule routes which token is not decided here: the step says which tokens are fresh prompt tokens and
which are generated, and seqtopk.routing.rules decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqtopk.engines.vllm.registry import WORKER
from seqtopk.routing.paged import PagedHistory, PagedLayout
from seqtopk.routing.ragged import RaggedBatch, ragged_batch
from seqtopk.routing.rules import TokenRules


@dataclass
class Step:
    batch: RaggedBatch
    paged: PagedLayout  # where the rows' earlier tokens are, and each token's KV slot (write_slots, -1: padding)
    fresh: torch.Tensor  # [N] prompt tokens of rows whose routing starts in this step (no context)
    generated: torch.Tensor  # [N] tokens past the prompt (sampled ones)
    prompt: torch.Tensor  # [N] real prompt tokens
    req_ids: list[str]
    _rules: dict = field(default_factory=dict)
    _classes: tuple | None = None

    def token_classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([2, N] long: prompt and generated flags, [2] their counts), for the statistics; once per step."""
        if self._classes is None:
            classes = torch.stack([self.prompt, self.generated]).long()
            self._classes = (classes, classes.sum(dim=1))
        return self._classes

    def history(self, store: torch.Tensor) -> PagedHistory:
        return self.paged.of(store)

    def rules(self, cfg) -> TokenRules:
        """Which rule routes each token (seqtopk.routing.rules decides); built once per step."""
        key = (cfg.prefill, cfg.decode)
        if key not in self._rules:
            self._rules[key] = TokenRules.per_token(cfg, self.fresh, self.generated, self.batch.max_query)
        return self._rules[key]


def current_step(num_tokens: int) -> Step | None:
    """The layout of the running forward, or None when it routes no request (profiling, warm-up)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    source = WORKER.source
    if source.group is None or not is_forward_context_available():
        return None
    context = get_forward_context()
    if context is source.last_context:
        return source.last_step
    step = _read_step(context, num_tokens)
    source.last_context, source.last_step = context, step
    return step


def _read_step(context, num_tokens: int) -> Step | None:
    # The model runner's persistent step buffers (filled before each forward, the same ones its attention
    # metadata is built from) serve every attention backend alike, MLA included.
    source = WORKER.source
    runner = source.runner()
    input_batch = runner.input_batch
    rows = input_batch.num_reqs
    if rows == 0 or isinstance(context.attn_metadata, list):
        return None  # warm-up / profiling forwards on dummy tokens carry no request (list form: DBO)
    table = input_batch.block_table[source.group]
    device = runner.seq_lens.device
    starts_host = runner.query_start_loc.cpu[: rows + 1]
    max_query = int((starts_host[1:] - starts_host[:-1]).max())
    batch = ragged_batch(runner.query_start_loc.gpu[: rows + 1], runner.seq_lens[:rows], num_tokens, max_query)
    # Longest context, from host copies (no device read): a decode row's context is its length minus one.
    longest = int(runner.optimistic_seq_lens_cpu[:rows].max())
    width = longest - 1 if max_query == 1 else int(batch.context.max())  # prefill steps may read the device
    slots = torch.where(batch.real, table.slot_mapping.gpu[:num_tokens].long(), -1)
    prompt_lens = input_batch.num_prompt_tokens_cpu_tensor[:rows].to(device, non_blocking=True)
    prompt = (batch.positions() < prompt_lens[batch.row]) & batch.real
    paged = PagedLayout(table.get_device_tensor(rows), table.block_size, batch.context, width, source.num_slots,
                        write_slots=slots)
    return Step(batch=batch, paged=paged, fresh=prompt & (batch.context[batch.row] == 0),
                generated=batch.real & ~prompt, prompt=prompt,
                req_ids=list(input_batch.req_ids[:rows]) if WORKER.trace is not None else [])
