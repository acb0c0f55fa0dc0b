"""Counting "how many competing values are strictly greater", the kernel of the streaming rule. Pure torch.

The causal rule (seqtopk.routing.rules.select_causal) takes a candidate when fewer than m*K earlier or
same-token values beat it. These functions count that without forming a sorted prefix for every token:
a broadcast compare while it stays small, sort + binary search or sqrt-bucketing when it does not.
"""

from __future__ import annotations

import torch

from seqtopk.routing.paged import NEG_INF


# Above this many (query x pool) comparisons in a call, counting switches from a broadcast compare to
# sort + binary search.
BROADCAST_LIMIT = 1 << 24  # 16 MB of booleans
# The same switch for causal chunks (prefill), to sqrt-bucketing: their broadcast also masks by position and
# sums a large boolean tensor (converted to int64 first), so it stops paying off much earlier: at 16M a
# 512-token causal prefill step took 48 ms per layer on the CPU, bucketed (1M) 4.8 ms.
CHUNK_BROADCAST_LIMIT = 1 << 20


def count_greater(pool: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each query, how many pool values are strictly greater. pool [B, P], queries [B, Q] -> [B, Q].

    Compares every pair in one broadcast while that stays small (decode steps: a few candidates against
    the history); otherwise sorts the pool and binary-searches the queries in it.
    """
    if pool.shape[1] == 0:
        return torch.zeros(queries.shape, dtype=torch.long, device=queries.device)
    if pool.shape[0] * pool.shape[1] * queries.shape[1] <= BROADCAST_LIMIT:
        return (pool.unsqueeze(1) > queries.unsqueeze(2)).sum(dim=2)
    ascending = torch.sort(pool, dim=1).values
    not_greater = torch.searchsorted(ascending, queries.contiguous(), right=True)
    return pool.shape[1] - not_greater


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
    if batch * queries.shape[1] * total <= CHUNK_BROADCAST_LIMIT:  # short chunks: compare directly
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
    step = max(1, BROADCAST_LIMIT // (size * max(batch, 1)))
    for lo in range(0, queries.shape[1], step):
        hi = min(lo + step, queries.shape[1])
        qb = q_bucket[:, lo:hi]
        rows = torch.arange(batch, device=device).unsqueeze(1)
        vals = bucket_vals[rows, qb]  # [B, q, size]
        owners = bucket_owner[rows, qb]
        inside = (vals > queries[:, lo:hi, None]) & (owners <= q_owner[lo:hi].view(1, -1, 1))
        counts[:, lo:hi] += inside.sum(dim=2)
    return counts.view(batch, length, width)
