"""SeqTopK selection: which (token, expert) pairs a sequence keeps. Pure torch, no engine imports.

Every engine adapter calls these functions; the routing rule exists here only. Shapes use
B sequences, T (or L) tokens per sequence, C = cap candidate experts per token (sorted best first).

- `capped_candidates`: each token's top-C experts by the family's selection score.
- `select_sequence`: the published prefill/training rule. The cut is the (n*K)-th largest capped score
  over the sequence's n real tokens; exact ties at the cut go to the earlier token, then the better rank.
- `select_causal`: the streaming rule ("expert cache"). Token t takes each capped expert whose score is at
  or above the (m_t*K)-th largest capped score among the m_t real tokens up to and including t. A chunk of
  new tokens is routed against the history of earlier capped scores; one-shot causal prefill, chunked
  prefill and token-by-token decoding therefore make the same choices.

Both rules keep each token's best `min_experts` experts regardless of the cut. With `exact_budget`, those
forced experts count toward the budget: the remaining n*(K - min_experts) pairs are chosen among the other
candidates, so a sequence spends exactly n*K pairs under `select_sequence`.
Padding tokens (valid == False) take no experts and do not count in n.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

# Above this many (query x pool) comparisons in a call, counting switches from a broadcast compare to
# sort + binary search.
_BROADCAST_LIMIT = 1 << 24  # 16 MB of booleans


def capped_candidates(scores: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`cap` experts per token: (values, ids), each [..., cap], best first."""
    return torch.topk(scores, cap, dim=-1)


def _split_forced(values: torch.Tensor, valid: torch.Tensor | None, k: int, min_experts: int,
                  exact_budget: bool):
    """Real tokens (all, if valid is None), the columns every real token keeps, the first column that
    competes for the cut, and the per-token budget it competes for."""
    if valid is None:
        valid = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
    forced_cols = min(min_experts, values.shape[-1])
    forced = valid.unsqueeze(-1).expand(*valid.shape, forced_cols)
    first = forced_cols if exact_budget else 0
    per_token = k - forced_cols if exact_budget else k
    return valid, forced, first, per_token


def _assemble(forced: torch.Tensor, first: int, take: torch.Tensor) -> torch.Tensor:
    """Full [.., cap] mask from the forced columns and the competing columns starting at `first`."""
    if first:  # the competing columns are exactly the non-forced ones
        return torch.cat([forced, take], dim=-1)
    if forced.shape[-1]:
        take = take.clone()
        take[..., : forced.shape[-1]] |= forced
    return take


def select_sequence(values: torch.Tensor, valid: torch.Tensor | None, k: int, min_experts: int = 1,
                    exact_budget: bool = False) -> torch.Tensor:
    """Published prefill rule. values: [B, T, C] capped scores, best first. Returns a bool mask [B, T, C]."""
    batch, tokens, cap = values.shape
    valid, forced, first, per_token = _split_forced(values, valid, k, min_experts, exact_budget)
    if per_token <= 0 or tokens == 0:
        return _assemble(forced, first, torch.zeros_like(values[..., first:], dtype=torch.bool))
    compete = values[..., first:]
    width = compete.shape[-1]
    # A padding token offers `per_token` slots at +inf and the rest at -inf: the (T*per_token)-th largest
    # of a row is then the (n*per_token)-th largest of its n real tokens, one static k for every row
    # (no host sync to learn how much padding each row has).
    pad_fill = torch.full((width,), NEG_INF, dtype=values.dtype, device=values.device)
    pad_fill[:per_token] = float("inf")
    compete = torch.where(valid.unsqueeze(-1), compete, pad_fill)
    flat = compete.reshape(batch, tokens * width)
    budget = tokens * per_token
    threshold = torch.kthvalue(flat, flat.shape[1] - budget + 1, dim=1, keepdim=True).values
    above = flat > threshold
    at = flat == threshold
    room = budget - above.sum(dim=1, keepdim=True)
    if flat.is_cuda:  # ties at the cut resolved without a host sync
        take = above | (at & (at.cumsum(dim=1) <= room))
    elif bool((at.sum(dim=1, keepdim=True) > room).any()):
        # Exact ties straddle the cut: keep the earliest of them (earlier token, then better rank).
        take = above | (at & (at.cumsum(dim=1) <= room))
    else:
        take = above | at
    take = take.view(batch, tokens, width) & valid.unsqueeze(-1)
    return _assemble(forced, first, take)


def count_greater(pool: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each query, how many pool values are strictly greater. pool [B, P], queries [B, Q] -> [B, Q].

    Compares every pair in one broadcast while that stays small (decode steps: a few candidates against
    the history); otherwise sorts the pool and binary-searches the queries in it.
    """
    if pool.shape[1] == 0:
        return torch.zeros(queries.shape, dtype=torch.long, device=queries.device)
    if pool.shape[0] * pool.shape[1] * queries.shape[1] <= _BROADCAST_LIMIT:
        return (pool.unsqueeze(1) > queries.unsqueeze(2)).sum(dim=2)
    ascending = torch.sort(pool, dim=1).values
    not_greater = torch.searchsorted(ascending, queries.contiguous(), right=True)
    return pool.shape[1] - not_greater


def select_causal(values: torch.Tensor, valid: torch.Tensor | None, k: int, min_experts: int = 1,
                  exact_budget: bool = False, history: torch.Tensor | None = None,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """Streaming rule for a chunk of new tokens. Returns a bool mask [B, L, C].

    values: [B, L, C] capped scores of the new tokens, best first. valid: [B, L] real (non-pad) tokens.
    history: [B, S, C] capped scores of earlier tokens of the same sequences (-inf rows for padding), or None.
    seen: [B] number of real earlier tokens (defaults to the real rows of history, or 0).
    """
    batch, length, cap = values.shape
    valid, forced, first, per_token = _split_forced(values, valid, k, min_experts, exact_budget)
    if per_token <= 0 or length == 0:
        return _assemble(forced, first, torch.zeros_like(values[..., first:], dtype=torch.bool))
    if seen is None:
        seen = torch.zeros(batch, dtype=torch.long, device=values.device)
        if history is not None and history.shape[1]:
            seen = torch.isfinite(history[..., 0]).sum(dim=1)
    compete = values[..., first:].masked_fill(~valid.unsqueeze(-1), NEG_INF)
    earlier = (history[..., first:].reshape(batch, -1) if history is not None
               else compete.new_empty(batch, 0))
    greater = causal_greater_counts(earlier, compete)  # [B, L, W]
    m = seen.unsqueeze(1) + valid.long().cumsum(dim=1)  # real tokens up to and including each new token
    take = (greater < (m * per_token).unsqueeze(-1)) & valid.unsqueeze(-1) & torch.isfinite(compete)
    return _assemble(forced, first, take)


def causal_greater_counts(earlier: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """For each chunk value (t, w): how many values of `earlier` and of chunk tokens <= t are strictly greater.

    earlier: [B, P] values of earlier tokens. chunk: [B, L, W]. Returns [B, L, W] counts.
    """
    batch, length, width = chunk.shape
    if length == 1:  # a decode step: the pool is the history plus the token's own better candidates
        own = (chunk.unsqueeze(-2) > chunk.unsqueeze(-1)).sum(dim=-1)
        return own + count_greater(earlier, chunk.view(batch, width)).view(batch, 1, width)
    queries = chunk.reshape(batch, length * width)
    total = earlier.shape[1] + length * width
    if batch * queries.shape[1] * total <= _BROADCAST_LIMIT:  # short chunks: compare directly
        owner = torch.arange(length, device=chunk.device).repeat_interleave(width)
        causal = owner.unsqueeze(0) <= torch.arange(length, device=chunk.device).unsqueeze(1)  # [L, L*W]
        beats = (queries.view(batch, 1, 1, -1) > chunk.unsqueeze(-1)) & causal.view(1, length, 1, -1)
        return count_greater(earlier, queries).view(batch, length, width) + beats.sum(dim=-1)
    return _bucketed_causal_counts(earlier, chunk)


def _bucketed_causal_counts(earlier: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """causal_greater_counts for long chunks in about O(N sqrt N) per sequence instead of O(N^2).

    Sort all N values and cut the sorted order into ~sqrt(N) buckets. A query counts (a) every value in
    buckets above the one holding the last copy of its value, taken from a per-token prefix histogram, and
    (b) the values of its own bucket, compared one by one. Both parts only count tokens <= the query's token.
    """
    batch, length, width = chunk.shape
    device = chunk.device
    queries = chunk.reshape(batch, length * width)
    pool = torch.cat([earlier, queries], dim=1)  # [B, N]
    n = pool.shape[1]
    # owner 0 = earlier tokens, owner t+1 = chunk token t
    owner = torch.cat([torch.zeros(earlier.shape[1], dtype=torch.long, device=device),
                       torch.arange(1, length + 1, device=device).repeat_interleave(width)])
    # Balance the in-bucket comparisons (N * size) against the prefix histogram (L * N / size).
    size = max(1, int((n / width) ** 0.5))
    buckets = (n + size - 1) // size
    sorted_vals, order = torch.sort(pool, dim=1)
    position_bucket = torch.arange(n, device=device) // size
    entry_bucket = torch.empty_like(order).scatter_(1, order, position_bucket.expand(batch, n))
    # hist[b, o, q]: values of owner o in bucket q; prefix over owners, then "strictly above bucket q".
    hist = torch.zeros(batch, (length + 1) * buckets, dtype=torch.long, device=device)
    hist.scatter_add_(1, owner * buckets + entry_bucket, torch.ones_like(entry_bucket))
    upto = hist.view(batch, length + 1, buckets).cumsum(dim=1)
    above = upto.sum(dim=2, keepdim=True) - upto.cumsum(dim=2)
    q_owner = torch.arange(1, length + 1, device=device).repeat_interleave(width)
    last = torch.searchsorted(sorted_vals, queries.contiguous(), right=True) - 1
    q_bucket = last.clamp(min=0) // size
    counts = above.view(batch, -1).gather(1, q_owner * buckets + q_bucket)
    # Values inside the query's own bucket, padded to full buckets with -inf (never greater).
    padded = buckets * size
    bucket_vals = torch.full((batch, padded), NEG_INF, dtype=pool.dtype, device=device)
    bucket_vals[:, :n] = sorted_vals
    bucket_owner = torch.full((batch, padded), length + 1, dtype=torch.long, device=device)
    bucket_owner[:, :n] = owner[order]
    bucket_vals = bucket_vals.view(batch, buckets, size)
    bucket_owner = bucket_owner.view(batch, buckets, size)
    step = max(1, _BROADCAST_LIMIT // (size * max(batch, 1)))
    for lo in range(0, queries.shape[1], step):
        hi = min(lo + step, queries.shape[1])
        qb = q_bucket[:, lo:hi]
        rows = torch.arange(batch, device=device).unsqueeze(1)
        vals = bucket_vals[rows, qb]  # [B, q, size]
        owners = bucket_owner[rows, qb]
        inside = (vals > queries[:, lo:hi, None]) & (owners <= q_owner[lo:hi].view(1, -1, 1))
        counts[:, lo:hi] += inside.sum(dim=2)
    return counts.view(batch, length, width)


def pack_choice(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Candidate ids with unchosen slots set to -1 (the form engine adapters pass to expert dispatch)."""
    return ids.masked_fill(~mask, -1)
