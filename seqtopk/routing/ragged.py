"""SeqTopK for packed batches: many sequences' new tokens in one flat list, as serving engines run them.

A serving step holds, per sequence (a row), a chunk of new tokens that continues what the row has already
seen (its context). This module recovers that structure from the usual `query_start_loc` / `seq_lens`
pair, pads the chunks into the dense [rows, tokens, C] form the rules in `seqtopk.routing.rules` take, applies
them (`rules.choose`: which rule routes which token is decided there, not here), and maps the choice back to
the flat tokens. The streaming rule's history comes as a dense tensor or in paged storage
(seqtopk.routing.paged).

Pure torch, no engine import. Nothing here reads a device value on the host (no .item(), .tolist(),
nonzero or boolean indexing) on the decode path, so it can run inside captured graphs; host-side ints
(`max_query`, history width) come from the engine's own metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from seqtopk.routing.paged import NEG_INF, PagedHistory
from seqtopk.routing.rules import TokenRules, choose



@dataclass
class RaggedBatch:
    """Where each flat token sits. N tokens (padding allowed at the end), R rows."""

    row: torch.Tensor  # [N] row of each token (clamped to a real row for padding tokens)
    col: torch.Tensor  # [N] index of the token inside its row's chunk
    real: torch.Tensor  # [N] False for padding tokens past the last row
    context: torch.Tensor  # [R] tokens the row saw before this step
    query: torch.Tensor  # [R] new tokens of the row in this step
    max_query: int  # longest chunk (host int: sets the dense width)
    starts: torch.Tensor | None = None  # [R+1] int64: token range of each row (query_start_loc)
    _kernel: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return self.context.shape[0]

    def real_tokens(self) -> torch.Tensor:
        return self.real

    def kernel_rows(self, device) -> dict:
        """Rows as the compiled kernel takes them: each row's token range, and its real earlier tokens."""
        if "row_start" not in self._kernel:
            starts = self.starts if self.starts is not None else torch.cat(
                [self.query.new_zeros(1), self.query.cumsum(0)])
            self._kernel.update(row_start=starts.long().contiguous(), token_valid=None,
                                row_seen=self.context.long().contiguous())
        return self._kernel

    def kernel_rules(self, rules: TokenRules) -> TokenRules:
        """The rules per token as the reference applies them to this step: a row with one new token routes it
        by the causal rule where the sequence rule was asked (rules.TokenRules.single_tokens). Once per step."""
        if self._kernel.get("rules_from") is not rules:
            if self.max_query == 1:
                laid = rules.single_tokens()
            else:
                laid = rules.rows_of_one(self.query[self.row] == 1)
            self._kernel.update(rules_from=rules, rules=laid)
        return self._kernel["rules"]

    def positions(self) -> torch.Tensor:
        """[N] position of each token in its sequence."""
        return self.context[self.row] + self.col


def ragged_batch(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int,
                 max_query: int) -> RaggedBatch:
    """Layout from chunk starts ([R+1], cumulative) and sequence lengths after the step ([R])."""
    rows = seq_lens.shape[0]
    starts = query_start_loc[: rows + 1].long()
    index = torch.arange(num_tokens, device=starts.device)
    row = torch.searchsorted(starts[1:], index, right=True)
    real = row < rows
    row = row.clamp(max=max(rows - 1, 0))
    query = starts[1:] - starts[:-1]
    return RaggedBatch(row=row, col=index - starts[row], real=real, context=seq_lens.long() - query,
                       query=query, max_query=max(int(max_query), 1), starts=starts.contiguous())


def _dense_index(batch: RaggedBatch) -> torch.Tensor:
    """[N] flat index into [R+1, max_query]; padding tokens go to the spare last row."""
    width = batch.max_query
    flat = batch.row * width + batch.col.clamp(0, width - 1)
    return torch.where(batch.real, flat, torch.full_like(flat, batch.rows * width))


def to_dense(values: torch.Tensor, batch: RaggedBatch, fill: float = NEG_INF):
    """[N, C] -> ([R, max_query, C] padded with `fill`, valid [R, max_query])."""
    width = batch.max_query
    dense = values.new_full(((batch.rows + 1) * width, values.shape[-1]), fill)
    dense.index_copy_(0, _dense_index(batch), values)  # padding tokens land in the spare row
    valid = torch.arange(width, device=values.device) < batch.query.unsqueeze(1)
    return dense[: batch.rows * width].view(batch.rows, width, -1), valid


def from_dense(dense: torch.Tensor, batch: RaggedBatch) -> torch.Tensor:
    """[R, max_query, C] -> [N, C]; padding tokens read the first row (callers mask them with `real`)."""
    flat = dense.reshape(batch.rows * batch.max_query, -1)
    return flat[_dense_index(batch).clamp(max=max(flat.shape[0] - 1, 0))]


def select_ragged(values: torch.Tensor, batch: RaggedBatch, rules: TokenRules, cfg,
                  history: torch.Tensor | None = None, fused=None) -> torch.Tensor:
    """SeqTopK choice for a packed step. values: [N, C] capped scores, best first. Returns bool [N, C].

    Each token is routed by its rule in `rules` (flat like the tokens): the causal rule against its row's
    history ([R, S, C], -inf past each row's context) and the earlier tokens of its chunk; the sequence
    rule over the tokens of its row that the rule routes, as one-shot prefill does; TopK alone.
    Padding tokens get no expert. cfg: the layer's ResolvedConfig. fused: see rules.choose.

    A step that mixes one-token rows (decode) with longer chunks (prefill) routes the two groups
    separately, so decode rows are not padded to the longest chunk; that split reads the chunk lengths on
    the host, which only prefill steps do.
    """
    if batch.max_query == 1:
        return _select_single(values, batch, rules, cfg, history, fused)
    if isinstance(history, PagedHistory):
        history = history.gather()
    query = batch.query.tolist()
    single = [r for r, q in enumerate(query) if q == 1]
    if single and len(single) < len(query):
        chunked = [r for r, q in enumerate(query) if q > 1]
        mask = torch.zeros_like(values, dtype=torch.bool)
        for rows in (single, chunked):
            sub, tokens, index = _row_subset(batch, rows, max(query[r] for r in rows))
            sub_history = history[index] if history is not None else None
            mask[tokens] = _select_dense(values[tokens], sub, rules.subset(tokens), cfg, sub_history, fused)
        return mask
    return _select_dense(values, batch, rules, cfg, history, fused)


def _row_subset(batch: RaggedBatch, rows: list[int], max_query: int):
    """The real tokens of some rows as their own batch: (batch, token indices [n], row indices [r])."""
    index = torch.tensor(rows, device=batch.row.device)
    renumber = torch.full((batch.rows,), -1, dtype=torch.long, device=index.device)
    renumber[index] = torch.arange(len(rows), device=index.device)
    tokens = torch.nonzero(batch.real & (renumber[batch.row] >= 0)).squeeze(1)
    sub = RaggedBatch(row=renumber[batch.row[tokens]], col=batch.col[tokens],
                      real=torch.ones_like(tokens, dtype=torch.bool), context=batch.context[index],
                      query=batch.query[index], max_query=max_query)
    return sub, tokens, index


def _select_single(values, batch: RaggedBatch, rules: TokenRules, cfg, history, fused) -> torch.Tensor:
    """A step of one new token per row: token r is row r's (query_start_loc is 0..R), tokens past R are
    padding, so the dense layout is a view and needs no copy. Rows may have no token (a CUDA graph's padded
    rows, query 0): their token slot is padding too."""
    rows = batch.rows
    rules = rules.subset(slice(0, rows)).laid_out(lambda codes: codes.unsqueeze(1)).single_tokens()
    valid = batch.real[:rows].unsqueeze(1)
    mask = choose(values[:rows].unsqueeze(1), valid, rules, cfg, history, seen=batch.context, fused=fused).squeeze(1)
    if rows == values.shape[0]:
        return mask
    return torch.cat([mask, mask.new_zeros(values.shape[0] - rows, mask.shape[1])])


def _select_dense(values, batch: RaggedBatch, rules: TokenRules, cfg, history, fused) -> torch.Tensor:
    if batch.max_query == 1:
        rules = rules.single_tokens()
    dense, valid = to_dense(values, batch)
    # One layout of the codes for every rule; padding gets -1, which no rule has.
    dense_rules = rules.laid_out(lambda codes: to_dense(codes.unsqueeze(-1).float(), batch, fill=-1.0)[0]
                                 .squeeze(-1).to(codes.dtype))
    mask = choose(dense, valid, dense_rules, cfg, history, seen=batch.context, fused=fused)
    return from_dense(mask, batch) & batch.real.unsqueeze(-1)
