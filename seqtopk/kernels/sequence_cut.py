"""One fused GPU kernel for the SeqTopK sequence rule (the prefill per-sequence cut), without host syncs.

Its torch reference is seqtopk.routing.rules.select_sequence, which it reproduces bit for bit: every routed
token keeps its first `forced` columns, and among the competing columns `values[:, first:]` of a row's n
routed tokens the n*per_token largest values are kept, exact ties at the cut going to the earlier token,
then the better (lower) column. The caller passes the budget split (rules.budget_split), not re-derived here.
Tokens the rule does not route (padding, or tokens another rule routes) take nothing and do not count in n.

Unlike the torch rule (torch.kthvalue over a padded [B, T*C] layout, then a cumsum for the ties), it works
on packed tokens (rows given by `starts`), reads nothing back to the host, and its output shape depends only
on its input shapes, so it can run inside a captured CUDA graph. Per row, one program:

- each value, converted to float32 (exact for bf16/fp16), becomes an order-preserving uint32 key (-0.0 is
  keyed as +0.0, since torch compares them equal);
- four passes over the row histogram one 8-bit digit of the keys (tl.histogram, 256 bins), most significant
  first, among the keys that match the digits chosen so far: this radix select finds the exact key of the
  (n*per_token)-th largest competing value, and how many entries equal to it fit in the budget;
- a fifth pass writes the mask: keys above the cut, plus as many keys equal to it as fit, in flat order
  (token-major, then column; a running count across blocks), plus the forced columns.

Two launches in all: a zero fill of the output (tokens outside every row stay False) and the kernel (plus a
copy when `values` is not contiguous). On CPU, tests run it under Triton's interpreter (TRITON_INTERPRET=1)
against the torch rule.

Equal to the torch rule on finite scores of routed tokens (padding may hold anything, nan included). Where
routed tokens hold infinite scores the two may differ: the torch rule fills padding with +-inf, so a cut at
-inf (fewer finite competing scores than the budget) can hand tie slots to padding, which then drops them
(the row spends less than n*per_token); the kernel gives them to the earliest routed -inf entries. NaN
scores of routed tokens are undefined in both.
"""

from __future__ import annotations

import torch

# When engines take the Triton kernels (CUDA with Triton): one rule for both, kept with the decode kernel.
from seqtopk.kernels.decode_step import available  # noqa: F401

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024  # entries (token x column) a program handles at a time


if triton is not None:

    @triton.jit
    def _load_keys(values_ptr, routed_ptr, begin, size, start, C: tl.constexpr, FIRST: tl.constexpr,
                   BLOCK: tl.constexpr):
        """One block of a row's entries (row-local flat index i = token * C + column, int32): (order-
        preserving uint32 keys, competing-and-routed, routed, column, inside-the-row)."""
        i = start + tl.arange(0, BLOCK)
        inside = i < size
        col = i % C
        routed = (tl.load(routed_ptr + begin + i // C, mask=inside, other=0) != 0) & inside
        live = routed & (col >= FIRST)
        v = tl.load(values_ptr + begin * C + i, mask=live, other=0.0).to(tl.float32)
        v = tl.where(v == 0.0, 0.0, v)  # -0.0 == +0.0, as torch compares them
        bits = v.to(tl.uint32, bitcast=True)
        key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        return key, live, routed, col, inside

    @triton.jit
    def _digit_counts(values_ptr, routed_ptr, begin, size, prefix, C: tl.constexpr, FIRST: tl.constexpr,
                      SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """Histogram of the 8-bit digit at SHIFT of the row's competing keys whose higher digits equal
        `prefix` (all of them when SHIFT == 24)."""
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, size, BLOCK):
            key, live, _, _, _ = _load_keys(values_ptr, routed_ptr, begin, size, start, C, FIRST, BLOCK)
            if SHIFT < 24:
                live = live & ((key >> (SHIFT + 8)) == prefix)
            hist += tl.histogram(((key >> SHIFT) & 0xFF).to(tl.int32), 256, mask=live)
        return hist

    @triton.jit
    def _pick_digit(hist, want):
        """The digit of the `want`-th largest key (1-based) under this histogram, and that key's rank among
        the keys with this digit (want minus the keys with a larger digit)."""
        at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with a digit >= d
        digit = tl.sum((at_least >= want).to(tl.int32), axis=0) - 1
        above = tl.sum(tl.where(tl.arange(0, 256) > digit, hist, 0), axis=0)
        return digit, want - above

    @triton.jit
    def _sequence_cut_kernel(values_ptr, starts_ptr, routed_ptr, out_ptr,
                             C: tl.constexpr, FIRST: tl.constexpr, FORCED: tl.constexpr,
                             PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        begin = tl.load(starts_ptr + row).to(tl.int64)
        end = tl.load(starts_ptr + row + 1).to(tl.int64)
        size = ((end - begin) * C).to(tl.int32)  # entries of the row (rows hold under 2**31 / C tokens)
        if PER_TOKEN > 0:
            # Radix select, most significant digit first. want: rank of the cut among the keys that match
            # the digits chosen so far; it ends as the number of keys equal to the cut that are taken.
            hist = _digit_counts(values_ptr, routed_ptr, begin, size, 0, C, FIRST, 24, BLOCK)
            competing = tl.sum(hist, axis=0)  # n routed tokens x (C - FIRST) columns
            want = tl.minimum((competing // (C - FIRST)) * PER_TOKEN, competing)
            digit, want = _pick_digit(hist, want)
            cut = digit.to(tl.uint32)
            hist = _digit_counts(values_ptr, routed_ptr, begin, size, cut, C, FIRST, 16, BLOCK)
            digit, want = _pick_digit(hist, want)
            cut = (cut << 8) | digit.to(tl.uint32)
            hist = _digit_counts(values_ptr, routed_ptr, begin, size, cut, C, FIRST, 8, BLOCK)
            digit, want = _pick_digit(hist, want)
            cut = (cut << 8) | digit.to(tl.uint32)
            hist = _digit_counts(values_ptr, routed_ptr, begin, size, cut, C, FIRST, 0, BLOCK)
            digit, want = _pick_digit(hist, want)
            cut = (cut << 8) | digit.to(tl.uint32)
            # (A row with no routed token has want == 0 and no live entry: it takes nothing.)
        ties_before = 0
        for start in range(0, size, BLOCK):
            key, live, routed, col, inside = _load_keys(values_ptr, routed_ptr, begin, size, start, C, FIRST,
                                                        BLOCK)
            take = routed & (col < FORCED)
            if PER_TOKEN > 0:
                tie = (live & (key == cut)).to(tl.int32)
                rank = ties_before + tl.cumsum(tie, axis=0) - tie  # ties earlier in the row
                take = take | (live & ((key > cut) | ((tie != 0) & (rank < want))))
                ties_before += tl.sum(tie, axis=0)
            tl.store(out_ptr + begin * C + start + tl.arange(0, BLOCK), take.to(tl.int8), mask=inside)


def sequence_cut(values: torch.Tensor, starts: torch.Tensor, routed: torch.Tensor, split, *,
                 block: int = BLOCK) -> torch.Tensor:
    """The sequence rule on packed tokens.

    values [N, C] (float32, bfloat16 or float16; packed tokens of R rows, each token's top-C scores best
    first), starts [R+1] int (row r owns tokens starts[r]:starts[r+1]; tokens outside every row take
    nothing), routed [N] bool (tokens this rule routes), split: (forced, first, per_token) from
    rules.budget_split. `starts` and `routed` stay on the device; nothing is read back. block: entries a program handles at a time (a power of 2; tests shrink it).
    Returns bool [N, C].
    """
    if triton is None:
        raise RuntimeError("sequence_cut needs triton (pip install triton)")
    if values.dim() != 2 or values.dtype not in DTYPES:
        raise ValueError(f"values must be [N, C] float32, bfloat16 or float16, got {values.dtype} "
                         f"{tuple(values.shape)}")
    tokens, cap = values.shape
    if starts.dim() != 1 or starts.numel() < 1 or starts.dtype not in (torch.int32, torch.int64):
        raise ValueError("starts must be a 1-D int32/int64 tensor [R+1]")
    if routed.shape != (tokens,) or routed.dtype != torch.bool:
        raise ValueError(f"routed must be bool [{tokens}], got {routed.dtype} {tuple(routed.shape)}")
    rows = starts.numel() - 1
    out = torch.zeros(tokens, cap, dtype=torch.int8, device=values.device)
    if rows == 0 or tokens == 0 or cap == 0:
        return out.view(torch.bool)
    forced, first, per_token = split
    if first >= cap:  # nothing competes
        per_token = 0
    _sequence_cut_kernel[(rows,)](
        values.contiguous(), starts.contiguous(), routed.contiguous().view(torch.uint8), out,
        C=cap, FIRST=first, FORCED=forced, PER_TOKEN=max(per_token, 0), BLOCK=block,
        num_warps=8 if block >= 1024 else 4,
    )
    return out.view(torch.bool)


def select_sequence_dense(values: torch.Tensor, valid: torch.Tensor | None, split) -> torch.Tensor:
    """rules.select_sequence on the dense layout: values [B, T, C], valid [B, T] bool (None: every token),
    split from rules.budget_split. Returns bool [B, T, C]."""
    batch, length, cap = values.shape
    flat = values.reshape(batch * length, cap)
    starts = torch.arange(batch + 1, device=values.device, dtype=torch.int64) * length
    routed = (valid.reshape(batch * length) if valid is not None
              else torch.ones(batch * length, dtype=torch.bool, device=values.device))
    return sequence_cut(flat, starts, routed, split).view(batch, length, cap)
