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

Each step's layout (rows, contexts, slots, which tokens are prompt, each row's decode band) is read once per
forward from the model runner's step buffers, with the block table and slot mapping of one full-attention KV
cache group, and the prompt lengths and band numbers the worker copies to the device before each forward
(forward.refresh_step_rows). The compiled layers of a CPU engine (seqtopk_cpu::moe_layer) take the same layout built
in C++ from the same buffers (hand_engine_step; tests/kernels/test_moe_step.py compares the two), and the Python
layout is then built only while a client traces.
A forward captured in a CUDA graph (decode batches) builds the same layout from the same buffers with
device ops only and fixed shapes, so each replay routes with the layout of its own step.
Which rule routes which token is not decided here: the step says which tokens are fresh prompt tokens and
which are generated, and seqtopk.routing.rules decides.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field

import torch

from seqtopk.engines.vllm.registry import WORKER
from seqtopk.routing.paged import PagedHistory, PagedLayout
from seqtopk.routing.ragged import RaggedBatch, ragged_batch
from seqtopk.routing.rules import RULES, TokenRules, rule_for


@dataclass
class Step:
    batch: RaggedBatch
    paged: PagedLayout  # where the rows' earlier tokens are, and each token's KV slot (write_slots, -1: padding)
    fresh: torch.Tensor  # [N] prompt tokens of rows whose routing starts in this step (no context)
    generated: torch.Tensor  # [N] tokens past the prompt (sampled ones)
    prompt: torch.Tensor  # [N] real prompt tokens
    req_ids: list[str]
    _rules: dict = field(default_factory=dict)
    _classes: torch.Tensor | None = None

    def token_class(self) -> torch.Tensor:
        """[N] int8 for the statistics (seqtopk.routing.router.RouteStats): 1 prompt, 2 generated, 0 padding."""
        if self._classes is None:
            self._classes = (self.prompt.to(torch.int8) + 2 * self.generated.to(torch.int8)).contiguous()
        return self._classes

    def history(self, store: torch.Tensor, bands: torch.Tensor | None = None) -> PagedHistory:
        return self.paged.of(store, bands)

    def hand_to_compiled_layers(self, cfg) -> None:
        """This step's layout, as every compiled layer (seqtopk_cpu::moe_layer) reads it, handed over once."""
        from seqtopk.kernels import ops

        rows = self.batch.kernel_rows(self.batch.context.device)
        rules = self.batch.kernel_rules(self.rules(cfg))
        paged = self.paged.kernel_args()
        ops.moe_set_step(row_start=rows["row_start"], token_valid=rows["token_valid"],
                         token_rule=None if rules.codes is None else rules.codes.reshape(-1).to(torch.int8).contiguous(),
                         rule=rules.code() if rules.codes is None else -1, row_seen=rows["row_seen"],
                         block_table=paged["block_table"], block_size=paged["block_size"],
                         row_length=paged["row_length"], write_slots=paged["write_slots"],
                         row_band=paged["row_band"], token_class=self.token_class())

    def rules(self, cfg) -> TokenRules:
        """Which rule routes each token (seqtopk.routing.rules decides); built once per step."""
        key = (cfg.prefill, cfg.decode)
        if key not in self._rules:
            self._rules[key] = TokenRules.per_token(cfg, self.fresh, self.generated, self.batch.max_query)
        return self._rules[key]


def current_step(num_tokens: int) -> Step | None:
    """The layout of the running forward, or None when it routes no request (profiling, warm-up)."""
    import vllm.forward_context as forward  # (imported with the engine; a module attribute lookup per layer)

    source = WORKER.source
    if source.group is None or not forward.is_forward_context_available():
        return None
    context = forward.get_forward_context()
    if context is source.last_context:
        return source.last_step
    runner = source.runner()
    step = _graph_step(context, runner, num_tokens) if capturing(runner) else _read_step(context, runner, num_tokens)
    source.last_context, source.last_step = context, step
    return step


def hand_engine_step(runner, num_tokens: int, cfg) -> bool:
    """Hand the running forward's layout to every compiled layer, built in C++ from the runner's step buffers (what
    step_from_buffers and Step.hand_to_compiled_layers build, without ~25 torch ops in Python); False, and nothing
    handed over, for a forward that routes no request (profiling, warm-up)."""
    import vllm.forward_context as forward
    from seqtopk.kernels import ops

    source = WORKER.source
    rows = runner.input_batch.num_reqs
    if source.group is None or rows == 0 or not forward.is_forward_context_available():
        return False
    if isinstance(forward.get_forward_context().attn_metadata, list):
        return False  # (dummy-token forwards of dual-batch overlap)
    starts, seq_lens, table, block_size, slots, prompt_lens, _, _ = _buffers(runner, rows, num_tokens)
    ops.moe_set_step_from_engine(
        query_start_loc=starts, seq_lens=seq_lens, block_table=table, block_size=block_size, slot_mapping=slots,
        prompt_lens=prompt_lens, row_band=None if source.row_band is None else source.row_band[:rows],
        tokens=num_tokens, rules=kind_rules(cfg))
    return True


@functools.lru_cache(maxsize=16)
def kind_rules(cfg) -> tuple[int, int, int]:
    """The rule codes (RULES) of a fresh prompt token, a generated token and a later prompt chunk's token (once per
    layer settings: asked every forward)."""
    return tuple(RULES.index(rule_for(cfg, fresh=fresh, generated=generated))
                 for fresh, generated in ((True, False), (False, True), (False, False)))


def capturing(runner) -> bool:
    """Whether this forward is being captured into a CUDA graph (its replays will not run Python)."""
    return runner.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def step_from_buffers(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                      block_size: int, slot_mapping: torch.Tensor, prompt_lens: torch.Tensor, num_tokens: int,
                      num_slots: int, *, max_query: int, width: int, req_ids: list[str] | None = None,
                      row_band: torch.Tensor | None = None) -> Step:
    """A step's layout from the engine's step buffers, with device ops only (no host read): R rows, N tokens.

    query_start_loc [R+1], seq_lens [R] (after this step), block_table [R, max_blocks], slot_mapping [>= N] (each
    token's KV slot, -1 for padding), prompt_lens [R], row_band [R] (each row's decode band, or None).
    max_query (longest chunk) and width (>= the longest context) are host ints that fix the shapes: a CUDA graph captures the step once per (R, N) and replays it
    with whatever these buffers hold, rows with no token (query 0) taking no experts and writing nothing.
    """
    batch = ragged_batch(query_start_loc, seq_lens, num_tokens, max_query)
    slots = torch.where(batch.real, slot_mapping[:num_tokens].long(), -1)
    prompt = (batch.positions() < prompt_lens[batch.row]) & batch.real
    paged = PagedLayout(block_table, block_size, batch.context, width, num_slots, write_slots=slots, row_band=row_band)
    return Step(batch=batch, paged=paged, fresh=prompt & (batch.context[batch.row] == 0),
                generated=batch.real & ~prompt, prompt=prompt, req_ids=req_ids or [])


def _buffers(runner, rows: int, num_tokens: int):
    """The model runner's persistent step buffers (filled before each forward, the same ones its attention
    metadata is built from, MLA included), for `rows` rows."""
    source = WORKER.source
    table = runner.input_batch.block_table[source.group]
    return (runner.query_start_loc.gpu[: rows + 1], runner.seq_lens[:rows], table.get_device_tensor(rows),
            table.block_size, table.slot_mapping.gpu[:num_tokens], source.prompt_lens[:rows], num_tokens,
            source.num_slots)


def _read_step(context, runner, num_tokens: int) -> Step | None:
    """The layout of an eagerly run forward; shapes from the host copies of the step's metadata."""
    input_batch = runner.input_batch
    rows = input_batch.num_reqs
    if rows == 0 or isinstance(context.attn_metadata, list):
        return None  # warm-up / profiling forwards on dummy tokens carry no request (list form: DBO)
    starts_host = runner.query_start_loc.cpu[: rows + 1]
    query_host = starts_host[1:] - starts_host[:-1]
    max_query = int(query_host.max())
    # Longest context from host copies (no device read); the optimistic lengths never fall short.
    width = int((runner.optimistic_seq_lens_cpu[:rows] - query_host).max())
    source = WORKER.source
    return step_from_buffers(*_buffers(runner, rows, num_tokens), max_query=max_query, width=width,
                             req_ids=list(input_batch.req_ids[:rows]) if WORKER.trace is not None else None,
                             row_band=source.row_band[:rows] if source.row_band is not None else None)


def _graph_step(context, runner, num_tokens: int) -> Step:
    """The layout of a forward being captured in a full CUDA graph: a uniform decode batch (one token per row,
    rows past the live ones padded with query 0). Every input is a persistent buffer that vLLM refreshes
    before each replay; the width is the block table's (the fused kernel walks each row's own length; the
    torch fallback's gather would be that wide, so a capture requires the kernel)."""
    descriptor = getattr(context, "batch_descriptor", None)
    rows = getattr(descriptor, "num_reqs", None) or num_tokens
    if descriptor is None or not descriptor.uniform or rows != num_tokens:
        raise RuntimeError(
            f"SeqTopK can be captured in a full CUDA graph only for decode batches of one token per request, "
            f"not {descriptor}; use cudagraph_mode FULL_AND_PIECEWISE, FULL_DECODE_ONLY or PIECEWISE")
    buffers = _buffers(runner, rows, num_tokens)
    width = buffers[2].shape[1] * buffers[3]
    return step_from_buffers(*buffers, max_query=1, width=width)
