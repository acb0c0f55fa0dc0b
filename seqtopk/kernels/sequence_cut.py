"""One fused GPU kernel for the SeqTopK sequence rule (the prefill per-sequence cut), without host syncs.

Its torch reference is seqtopk.routing.rules.select_sequence, which it reproduces bit for bit: every routed
token keeps its first `forced` columns, and among the competing columns `values[:, first:]` of a row's n
routed tokens the n*per_token largest values are kept, exact ties at the cut going to the earlier token,
then the better (lower) column. The caller passes the budget split (rules.budget_split), not re-derived here.
Tokens the rule does not route (padding, or tokens another rule routes) take nothing and do not count in n.

Unlike the torch rule (torch.kthvalue over a padded [B, T*C] layout, then a cumsum for the ties), it works
on packed tokens (rows given by `starts`), reads nothing back to the host, and its output shape depends only
on its input shapes, so it can run inside a captured CUDA graph. Per row:

- each value, converted to float32 (exact for bf16/fp16), becomes an order-preserving uint32 key (-0.0 is
  keyed as +0.0, since torch compares them equal);
- four passes histogram one 8-bit digit of the keys (256 bins), most significant first, among the keys that
  match the digits chosen so far: this radix select finds the exact key of the (n*per_token)-th largest
  competing value (n, the routed tokens, comes from the first pass's total), and how many entries equal to
  it fit in the budget;
- a last pass writes the mask: keys above the cut, plus as many keys equal to it as fit, in flat order
  (token-major, then column), plus the forced columns.

Two paths, chosen from host shapes only:

- one program per row (short rows, or no known bound on the row length): each pass is a serial loop over
  the row in blocks of BLOCK entries (tl.histogram), the ties counted as it goes. Two launches: a zero fill
  of the output (tokens outside every row stay False) and the kernel.
- split rows (a row may exceed SPLIT_ABOVE entries: select_sequence_dense knows T, sequence_cut takes
  `max_row_tokens`): grid (R, P), program (r, p) owns CHUNK entries of row r. Each histogram launch replays
  the digit picks of the earlier passes from hist [R, 4, 256] (256-element ops) and adds its chunk's counts
  into hist[r, pass] with integer atomic adds (order-free: deterministic); a tie launch writes each chunk's
  count of keys equal to the cut into ties [R, P]; the write launch adds up ties[r, :p] for its chunk's
  first rank. Eight launches: the output and hist zero fills, 4 histograms, ties, write (only the two
  fills and the write when nothing competes).

Plus a copy when `values` is not contiguous. On CPU, tests run both paths under Triton's interpreter
(TRITON_INTERPRET=1) against the torch rule.

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
CHUNK = 1024  # entries per program on the split path (rows over several programs)
SPLIT_ABOVE = 8 * CHUNK  # rows longer than this many entries take the split path (when their bound is known)


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
    def _digit_counts(values_ptr, routed_ptr, begin, lo, hi, size, prefix, C: tl.constexpr,
                      FIRST: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """Histogram of the 8-bit digit at SHIFT of the competing keys of row entries [lo, hi) whose higher
        digits equal `prefix` (all of them when SHIFT == 24)."""
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
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
    def _budget(hist, C: tl.constexpr, FIRST: tl.constexpr, PER_TOKEN: tl.constexpr):
        """The cut's rank among a row's competing keys (n*per_token), from the first pass's histogram."""
        competing = tl.sum(hist, axis=0)  # n routed tokens x (C - FIRST) columns
        return tl.minimum((competing // (C - FIRST)) * PER_TOKEN, competing)

    @triton.jit
    def _write_mask(values_ptr, routed_ptr, out_ptr, begin, lo, hi, size, cut, want, ties_before,
                    C: tl.constexpr, FIRST: tl.constexpr, FORCED: tl.constexpr, PER_TOKEN: tl.constexpr,
                    BLOCK: tl.constexpr):
        """Writes the mask of row entries [lo, hi): keys above the cut, keys equal to it while their rank
        among the row's ties (ties_before of them lie before lo) is under `want`, and the forced columns."""
        seen = 0
        for start in range(lo, hi, BLOCK):
            key, live, routed, col, inside = _load_keys(values_ptr, routed_ptr, begin, size, start, C, FIRST,
                                                        BLOCK)
            take = routed & (col < FORCED)
            if PER_TOKEN > 0:
                tie = (live & (key == cut)).to(tl.int32)
                rank = ties_before + seen + tl.cumsum(tie, axis=0) - tie  # ties earlier in the row
                take = take | (live & ((key > cut) | ((tie != 0) & (rank < want))))
                seen += tl.sum(tie, axis=0)
            tl.store(out_ptr + begin * C + start + tl.arange(0, BLOCK), take.to(tl.int8), mask=inside)

    @triton.jit
    def _sequence_cut_kernel(values_ptr, starts_ptr, routed_ptr, out_ptr,
                             C: tl.constexpr, FIRST: tl.constexpr, FORCED: tl.constexpr,
                             PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row: the radix select and the write, each a serial loop over the row."""
        row = tl.program_id(0)
        begin = tl.load(starts_ptr + row).to(tl.int64)
        end = tl.load(starts_ptr + row + 1).to(tl.int64)
        size = ((end - begin) * C).to(tl.int32)  # entries of the row (rows hold under 2**31 / C tokens)
        cut = 0
        want = 0
        if PER_TOKEN > 0:
            # Radix select, most significant digit first. want: rank of the cut among the keys that match
            # the digits chosen so far; it ends as the number of keys equal to the cut that are taken.
            hist = _digit_counts(values_ptr, routed_ptr, begin, 0, size, size, 0, C, FIRST, 24, BLOCK)
            digit, want = _pick_digit(hist, _budget(hist, C, FIRST, PER_TOKEN))
            cut = digit.to(tl.uint32)
            hist = _digit_counts(values_ptr, routed_ptr, begin, 0, size, size, cut, C, FIRST, 16, BLOCK)
            digit, want = _pick_digit(hist, want)
            cut = (cut << 8) | digit.to(tl.uint32)
            hist = _digit_counts(values_ptr, routed_ptr, begin, 0, size, size, cut, C, FIRST, 8, BLOCK)
            digit, want = _pick_digit(hist, want)
            cut = (cut << 8) | digit.to(tl.uint32)
            hist = _digit_counts(values_ptr, routed_ptr, begin, 0, size, size, cut, C, FIRST, 0, BLOCK)
            digit, want = _pick_digit(hist, want)
            cut = (cut << 8) | digit.to(tl.uint32)
            # (A row with no routed token has want == 0 and no live entry: it takes nothing.)
        _write_mask(values_ptr, routed_ptr, out_ptr, begin, 0, size, size, cut, want, 0, C, FIRST, FORCED,
                    PER_TOKEN, BLOCK)

    # Split rows: program (r, p) of a grid (R, P) owns entries [p*CHUNK, (p+1)*CHUNK) of row r; the row's
    # histograms hist[r] ([4, 256] int32, zeroed) gather every chunk's counts with atomic adds.

    @triton.jit
    def _chunk(starts_ptr, C: tl.constexpr, CHUNK: tl.constexpr):
        """This program's row and chunk: (row, first token of the row, entries of the row, chunk [lo, hi)).
        The row's last program also takes whatever lies past P*CHUNK (a row longer than the host's bound)."""
        row = tl.program_id(0)
        part = tl.program_id(1)
        begin = tl.load(starts_ptr + row).to(tl.int64)
        end = tl.load(starts_ptr + row + 1).to(tl.int64)
        size = ((end - begin) * C).to(tl.int32)
        lo = part * CHUNK
        hi = tl.where(part == tl.num_programs(1) - 1, size, tl.minimum(lo + CHUNK, size))
        return row, begin, size, lo, hi

    @triton.jit
    def _replay(hist_ptr, PASSES: tl.constexpr, C: tl.constexpr, FIRST: tl.constexpr,
                PER_TOKEN: tl.constexpr):
        """The digit picks of a row's first PASSES passes (>= 1), from its histograms: (the cut's top
        8*PASSES bits, the cut's rank among the keys that match them)."""
        bins = tl.arange(0, 256)
        hist = tl.load(hist_ptr + bins)
        digit, want = _pick_digit(hist, _budget(hist, C, FIRST, PER_TOKEN))
        cut = digit.to(tl.uint32)
        for s in tl.static_range(1, PASSES):
            digit, want = _pick_digit(tl.load(hist_ptr + s * 256 + bins), want)
            cut = (cut << 8) | digit.to(tl.uint32)
        return cut, want

    @triton.jit
    def _split_hist_kernel(values_ptr, starts_ptr, routed_ptr, hist_ptr, C: tl.constexpr, FIRST: tl.constexpr,
                           PER_TOKEN: tl.constexpr, PASS: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr):
        """Pass PASS of the radix select: adds this chunk's digit counts (keys matching the prefix chosen by
        the earlier passes) into hist[row, PASS]."""
        row, begin, size, lo, hi = _chunk(starts_ptr, C, CHUNK)
        if lo < hi:  # (chunks past the end of a shorter row hold nothing)
            hist_ptr += row * 1024
            prefix = 0
            if PASS > 0:
                prefix, want = _replay(hist_ptr, PASS, C, FIRST, PER_TOKEN)
            hist = _digit_counts(values_ptr, routed_ptr, begin, lo, hi, size, prefix, C, FIRST, 24 - 8 * PASS,
                                 BLOCK)
            tl.atomic_add(hist_ptr + PASS * 256 + tl.arange(0, 256), hist, mask=hist != 0, sem="relaxed")

    @triton.jit
    def _split_ties_kernel(values_ptr, starts_ptr, routed_ptr, hist_ptr, ties_ptr, C: tl.constexpr,
                           FIRST: tl.constexpr, PER_TOKEN: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr):
        """ties[row, part]: this chunk's competing keys equal to the cut (left unset for an empty chunk, which
        only later empty chunks follow: no write reads it)."""
        row, begin, size, lo, hi = _chunk(starts_ptr, C, CHUNK)
        if lo < hi:
            cut, want = _replay(hist_ptr + row * 1024, 4, C, FIRST, PER_TOKEN)
            ties = 0
            for start in range(lo, hi, BLOCK):
                key, live, routed, col, inside = _load_keys(values_ptr, routed_ptr, begin, size, start, C, FIRST,
                                                            BLOCK)
                ties += tl.sum((live & (key == cut)).to(tl.int32), axis=0)
            tl.store(ties_ptr + row * tl.num_programs(1) + tl.program_id(1), ties)

    @triton.jit
    def _split_write_kernel(values_ptr, starts_ptr, routed_ptr, hist_ptr, ties_ptr, out_ptr,
                            C: tl.constexpr, FIRST: tl.constexpr, FORCED: tl.constexpr,
                            PER_TOKEN: tl.constexpr, PARTS: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK: tl.constexpr):
        """The mask of this chunk; ties in earlier chunks of the row come from ties[row, :part]. PARTS: a
        power of 2 >= P."""
        row, begin, size, lo, hi = _chunk(starts_ptr, C, CHUNK)
        if lo < hi:
            cut = 0
            want = 0
            before = 0
            if PER_TOKEN > 0:
                cut, want = _replay(hist_ptr + row * 1024, 4, C, FIRST, PER_TOKEN)
                part = tl.arange(0, PARTS)
                before = tl.sum(tl.load(ties_ptr + row * tl.num_programs(1) + part,
                                        mask=part < tl.program_id(1), other=0), axis=0)
            _write_mask(values_ptr, routed_ptr, out_ptr, begin, lo, hi, size, cut, want, before, C, FIRST,
                        FORCED, PER_TOKEN, BLOCK)


def sequence_cut(values: torch.Tensor, starts: torch.Tensor, routed: torch.Tensor, split, *,
                 max_row_tokens: int | None = None, block: int = BLOCK, chunk: int = CHUNK,
                 split_above: int = SPLIT_ABOVE) -> torch.Tensor:
    """The sequence rule on packed tokens.

    values [N, C] (float32, bfloat16 or float16; packed tokens of R rows, each token's top-C scores best
    first), starts [R+1] int (row r owns tokens starts[r]:starts[r+1]; tokens outside every row take
    nothing), routed [N] bool (tokens this rule routes), split: (forced, first, per_token) from
    rules.budget_split. `starts` and `routed` stay on the device; nothing is read back.
    max_row_tokens: a host bound on the tokens of a row (None: unknown). When it makes a row longer than
    `split_above` entries, rows are split over ceil(max_row_tokens * C / chunk) programs each; otherwise one
    program per row. A row longer than the bound stays exact: its last program takes the excess, serially.
    block, chunk: entries a program handles at a time, and per split program (powers of 2; tests shrink
    them, and split_above). Returns bool [N, C].
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
    if any(n < 1 or n & (n - 1) for n in (block, chunk)):
        raise ValueError(f"block and chunk must be powers of 2, got {block}, {chunk}")
    rows = starts.numel() - 1
    out = torch.zeros(tokens, cap, dtype=torch.int8, device=values.device)
    if rows == 0 or tokens == 0 or cap == 0:
        return out.view(torch.bool)
    forced, first, per_token = split[:3]
    if len(split) > 3 and split[3] != 1:
        raise ValueError("the Triton sequence cut takes a whole per-token budget; a fractional k runs on the torch rule")
    if first >= cap:  # nothing competes
        per_token = 0
    args = (values.contiguous(), starts.contiguous(), routed.contiguous().view(torch.uint8))
    consts = dict(C=cap, FIRST=first, PER_TOKEN=max(per_token, 0))
    if max_row_tokens is None or max_row_tokens * cap <= split_above:
        _sequence_cut_kernel[(rows,)](*args, out, FORCED=forced, BLOCK=block, num_warps=_warps(block),
                                      **consts)
    else:
        _split_cut(args, out, rows, -(-max_row_tokens * cap // chunk), forced, consts, chunk, min(block, chunk))
    return out.view(torch.bool)


def _warps(block: int) -> int:
    return 8 if block >= 1024 else 4


def _split_cut(args, out, rows: int, parts: int, forced: int, consts: dict, chunk: int, block: int) -> None:
    """Each row over `parts` programs: 4 histogram launches, 1 tie count, 1 write (only the write when
    nothing competes), on buffers hist [R, 4, 256] (one zero fill) and ties [R, P]."""
    device = out.device
    hist = torch.zeros(rows, 4, 256, dtype=torch.int32, device=device)
    ties = torch.empty(rows, parts, dtype=torch.int32, device=device)
    grid = (rows, parts)
    launch = dict(CHUNK=chunk, BLOCK=block, num_warps=_warps(block), **consts)
    if consts["PER_TOKEN"] > 0:
        for digit_pass in range(4):  # most significant digit first
            _split_hist_kernel[grid](*args, hist, PASS=digit_pass, **launch)
        _split_ties_kernel[grid](*args, hist, ties, **launch)
    _split_write_kernel[grid](*args, hist, ties, out, FORCED=forced, PARTS=triton.next_power_of_2(parts),
                              **launch)


def select_sequence_dense(values: torch.Tensor, valid: torch.Tensor | None, split, **kwargs) -> torch.Tensor:
    """rules.select_sequence on the dense layout: values [B, T, C], valid [B, T] bool (None: every token),
    split from rules.budget_split; kwargs (block, chunk, split_above) go to sequence_cut. Every row holds T
    tokens, so long rows take the split path. Returns bool [B, T, C]."""
    batch, length, cap = values.shape
    flat = values.reshape(batch * length, cap)
    starts = torch.arange(batch + 1, device=values.device, dtype=torch.int64) * length
    routed = (valid.reshape(batch * length) if valid is not None
              else torch.ones(batch * length, dtype=torch.bool, device=values.device))
    return sequence_cut(flat, starts, routed, split, max_row_tokens=length, **kwargs).view(batch, length, cap)
