"""SeqTopK rules: which rule routes each token, and which (token, expert) pairs each rule keeps.

This is the only place where routing decisions are made, and the torch reference of every kernel that applies
them (the compiled CPU ops in seqtopk/kernels/cpu, the Triton kernels in seqtopk/kernels; which one runs is
decided in seqtopk.kernels.backend). Pure torch, no engine imports. Shapes use B sequences, T (or L) tokens per
sequence, C = cap candidate experts per token (sorted best first).

Which rule (`rule_for`, the one decision):
- a token that starts its sequence's routing (a prompt routed from its first token, training, a plain
  forward) follows `prefill`: "sequence" (published, non-causal) or "causal";
- a generated token follows `decode`: "expert_cache" -> the causal (streaming) rule, "topk" -> plain TopK;
- any other token continuing a sequence (a later chunk of a chunked prompt) follows the causal rule.

The rules:
- `select_sequence`: the published prefill/training rule. The cut is the (n*K)-th largest capped score
  over the sequence's n real tokens; exact ties at the cut go to the earlier token, then the better rank.
- `select_causal`: the streaming rule ("expert cache"). Token t takes each capped expert whose score is at
  or above the (m_t*K)-th largest capped score among the m_t real tokens up to and including t. A chunk of
  new tokens is routed against the history of earlier capped scores; one-shot causal prefill, chunked
  prefill and token-by-token decoding therefore make the same choices.
- `topk_mask`: stock TopK, each real token's best K.

Both SeqTopK rules keep each token's best `min_experts` experts regardless of the cut. With `exact_budget`,
those forced experts count toward the budget (seqtopk.budget.budget_split): the remaining n*(K - min_experts) pairs are
chosen among the other candidates, so a sequence spends exactly n*K pairs under `select_sequence`.
Padding tokens (valid == False) take no experts and do not count in n.

Unchosen slots (`pack`): engines differ in what their kernels accept, so the convention is a parameter:
"drop" writes expert id -1 (kernels that skip them), "repeat_best" repeats the token's best expert with
weight 0 (fixed-width kernels that need a valid id).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtopk.budget import budget_split
from seqtopk.routing.counting import causal_greater_counts
from seqtopk.routing.paged import NEG_INF, PagedHistory

SEQUENCE, CAUSAL, TOPK = "sequence", "causal", "topk"
RULES = (SEQUENCE, CAUSAL, TOPK)  # a rule's code is its index here
UNCHOSEN = ("drop", "repeat_best")


# ------------------------------------------------------------------------------------ which rule


def rule_for(cfg, *, fresh: bool, generated: bool) -> str:
    """The rule that routes a token. fresh: its sequence's routing starts in this step (no earlier tokens);
    generated: it was sampled (past the prompt). cfg: a ResolvedConfig (prefill, decode)."""
    if fresh:
        return cfg.prefill
    if generated and cfg.decode == "topk":
        return TOPK
    return CAUSAL


def describe_rules(cfg) -> str:
    """How prompt and generated tokens are routed under these settings, in words."""
    names = {SEQUENCE: "sequence rule", CAUSAL: "streaming expert-cache rule", TOPK: "per-token TopK rule"}
    return (f"prompt: {names[rule_for(cfg, fresh=True, generated=False)]}; "
            f"generated: {names[rule_for(cfg, fresh=False, generated=True)]}")


@dataclass
class TokenRules:
    """Which rule routes each token of one forward.

    `present` lists the rules some token may use, known on the host without reading the device, so rules
    no token uses cost nothing. `codes` ([N] int8, index into RULES, flat like the step's tokens) is None
    when one rule routes every token.
    """

    present: tuple[str, ...]
    codes: torch.Tensor | None = None

    @classmethod
    def uniform(cls, rule: str) -> "TokenRules":
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        return cls(present=(rule,))

    @classmethod
    def for_forward(cls, cfg, continuing: bool) -> "TokenRules":
        """A forward whose tokens all start their sequences (continuing=False) or all continue a KV cache.

        A forward that continues a cache is treated as generation: transformers does not say which of its
        tokens are prompt, and decode steps, assisted-decoding verification and chunked prefill all come
        this way.
        """
        return cls.uniform(rule_for(cfg, fresh=not continuing, generated=continuing))

    @classmethod
    def per_token(cls, cfg, fresh: torch.Tensor, generated: torch.Tensor, longest_chunk: int) -> "TokenRules":
        """Per-token rules of a packed serving step. fresh, generated: [N] bool. longest_chunk: the longest
        run of new tokens of one sequence in this step (host int). A one-token chunk routes the same under
        the sequence and the causal rule, so a step of single tokens never lists the sequence rule.
        Device ops only (no host copy), so a captured CUDA graph can hold them."""
        single = longest_chunk <= 1

        def rule(fresh_token: bool, generated_token: bool) -> str:
            chosen = rule_for(cfg, fresh=fresh_token, generated=generated_token)
            return CAUSAL if single and chosen == SEQUENCE else chosen

        # (a fresh token is a prompt token, never a generated one)
        kinds = {"fresh": rule(True, False), "generated": rule(False, True), "other": rule(False, False)}
        present = tuple(r for r in RULES if r in kinds.values())
        if len(present) == 1:
            return cls(present=present)
        codes = torch.full(fresh.shape, RULES.index(kinds["other"]), dtype=torch.int8, device=fresh.device)
        codes = codes.masked_fill(generated, RULES.index(kinds["generated"]))
        return cls(present=present, codes=codes.masked_fill(fresh, RULES.index(kinds["fresh"])))

    def single_tokens(self) -> "TokenRules":
        """The rules for one-token chunks: on a single new token the sequence rule is the causal rule (the
        cut over one token; exact ties between its own candidates aside), so the causal rule routes it, as
        every decode step does."""
        if SEQUENCE not in self.present:
            return self
        present = tuple(r for r in RULES if r in set(self.present) - {SEQUENCE} | {CAUSAL})
        if len(present) == 1:
            return TokenRules(present=present)
        codes = self.codes
        if codes is not None:
            codes = torch.where(codes == RULES.index(SEQUENCE), torch.full_like(codes, RULES.index(CAUSAL)), codes)
        return TokenRules(present=present, codes=codes)

    def rows_of_one(self, single: torch.Tensor) -> "TokenRules":
        """The rules with `single_tokens` applied to some tokens only: those whose sequence has one new token in
        this step (single: [N] bool), as a packed step of mixed chunk lengths routes them. Always per-token codes."""
        if SEQUENCE not in self.present:
            return self
        codes = self.codes if self.codes is not None else torch.full(
            single.shape, RULES.index(self.present[0]), dtype=torch.int8, device=single.device)
        codes = torch.where(single & (codes == RULES.index(SEQUENCE)), torch.full_like(codes, RULES.index(CAUSAL)), codes)
        return TokenRules(present=tuple(r for r in RULES if r in set(self.present) | {CAUSAL}), codes=codes)

    def code(self) -> int:
        """The rule's code when one rule routes every token (codes is None)."""
        return RULES.index(self.present[0])

    def tokens(self, rule: str) -> torch.Tensor | None:
        """Bool, shaped like `codes`: the tokens this rule routes (None: every token, when it is the only rule)."""
        if self.codes is None:
            return None
        return self.codes == RULES.index(rule)

    def subset(self, index: torch.Tensor) -> "TokenRules":
        """The rules of some tokens (index: [n] positions into the step's tokens)."""
        return TokenRules(self.present, None if self.codes is None else self.codes[index])

    def laid_out(self, lay_out) -> "TokenRules":
        """The same rules with `codes` passed through `lay_out` (e.g. flat [N] -> dense [B, T])."""
        return self if self.codes is None else TokenRules(self.present, lay_out(self.codes))


def choose(values: torch.Tensor, valid: torch.Tensor | None, rules: TokenRules, cfg,
           history: torch.Tensor | None = None, seen: torch.Tensor | None = None, fused=None) -> torch.Tensor:
    """Apply each token's rule. values: [B, T, C] capped scores, best first; valid: [B, T] real tokens.

    rules: with per-token codes laid out [B, T] like `values` (engines lay out `TokenRules.codes` as they
    lay out the values; padding positions may hold any code outside RULES).
    history / seen: the earlier tokens of each sequence, for the causal rule (see select_causal).
    fused: the Triton steps (seqtopk.kernels.backend.TritonSteps) that may take the sequence cut and one-token
    causal steps, or None; seqtopk.routing.router.route decides. Returns the chosen slots, bool [B, T, C].
    """
    k, min_experts, exact = cfg.k, cfg.min_experts, cfg.exact_budget
    mask = None
    if SEQUENCE in rules.present:
        flagged = rules.tokens(SEQUENCE)
        routed = valid if flagged is None else (flagged if valid is None else valid & flagged)
        mask = select_sequence(values, routed, k, min_experts, exact, fused=fused)
    if CAUSAL in rules.present:
        flagged = rules.tokens(CAUSAL)
        # Mixed steps with the sequence rule are prefill steps, which may read the device: a step of fresh
        # prompts only skips the causal pass.
        if mask is None or flagged is None or bool(flagged.any()):
            causal = select_causal(values, valid, k, min_experts, exact, history, seen, fused=fused)
            mask = causal if mask is None or flagged is None else torch.where(flagged.unsqueeze(-1), causal, mask)
    if TOPK in rules.present:
        flagged = rules.tokens(TOPK)
        plain = topk_mask(values, k, valid)
        mask = plain if mask is None or flagged is None else torch.where(flagged.unsqueeze(-1), plain, mask)
    return mask


# ------------------------------------------------------------------------------------- the rules


def known_pair_count(rule: str, cfg, tokens: int, rows: int | None = 1) -> int | None:
    """Pairs a forward spends, when that is known before routing; None when only the routing itself tells.

    rows sequences of `tokens` token slots each (padding included: padded rows spend fewer, the rest are
    filler rows); rows=None: `tokens` packed from sequences of unknown lengths (a serving step). The sequence
    rule spends each sequence's own budget, sum over rows of B(n_row), which equals B(sum n) only for a whole k
    (B is linear then): for a fractional k packed rows are not known in advance."""
    if rule == TOPK:
        return tokens * cfg.k * (rows or 1)
    if rule == SEQUENCE and cfg.exact_budget:
        split = cfg.split  # (exact_budget is set here)
        if rows is None:
            if split.scale != 1:
                return None
            rows = 1
        return rows * (tokens * split.forced + split.pairs(tokens))
    return None


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Each score's rank as an int32 (larger score, larger key): floats compared as floats, -0.0 equal to +0.0,
    NaN above +inf. The compiled top-cap (seqtopk/kernels/cpu/candidates.cpp) uses the same map."""
    bits = (scores.float() + 0.0).view(torch.int32)  # (bf16 and half widen exactly; + 0.0 turns -0.0 into +0.0)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def capped_candidates(scores: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`cap` experts per token: (values, ids), each [..., cap], best first, exact ties to the lower expert id.

    The order within a token is part of the routing (the rules cut at slot boundaries), so it is defined here
    rather than left to torch.topk, whose order of ties differs between devices; every path sorts this way."""
    experts = scores.shape[-1]
    if scores.dtype == torch.float64:  # (no exact 32-bit key; a stable sort keeps ties in id order)
        ids = torch.sort(scores + 0.0, dim=-1, descending=True, stable=True).indices[..., :cap]
        return scores.gather(-1, ids), ids
    if experts > 1 << 16:
        raise ValueError(f"capped_candidates ranks at most 65536 experts, got {experts}")
    lower_first = (1 << 16) - 1 - torch.arange(experts, device=scores.device)
    keys = order_keys(scores).long() * (1 << 16) + lower_first
    ids = (1 << 16) - 1 - (torch.topk(keys, cap, dim=-1).values & 0xFFFF)
    return scores.gather(-1, ids), ids


def topk_mask(values: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Stock TopK over candidates sorted best first: the first k slots of every real token. [..., C] bool."""
    if k != int(k):
        raise ValueError(f"the TopK rule gives every token exactly k experts: k must be whole, got {k}")
    mask = (torch.arange(values.shape[-1], device=values.device) < k).expand(values.shape)
    return mask & valid.unsqueeze(-1) if valid is not None else mask.clone()


def pack(ids: torch.Tensor, mask: torch.Tensor, unchosen: str = "drop") -> torch.Tensor:
    """Candidate ids [N, C] as MoE kernels take them: "drop" puts -1 in unchosen slots, "repeat_best" the
    token's best expert (its weight is 0, so it adds nothing)."""
    if unchosen == "drop":
        return ids.masked_fill(~mask, -1)
    if unchosen == "repeat_best":
        return torch.where(mask, ids, ids[:, :1])
    raise ValueError(f"unchosen must be one of {UNCHOSEN}, got {unchosen!r}")


def _split_forced(values: torch.Tensor, valid: torch.Tensor | None, k, min_experts: int,
                  exact_budget: bool):
    """Real tokens (all, if valid is None), the columns every real token keeps, and the budget split."""
    if valid is None:
        valid = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
    split = budget_split(k, values.shape[-1], min_experts, exact_budget)
    forced = valid.unsqueeze(-1).expand(*valid.shape, split.forced)
    return valid, forced, split


def _assemble(forced: torch.Tensor, first: int, take: torch.Tensor) -> torch.Tensor:
    """Full [.., cap] mask from the forced columns and the competing columns starting at `first`."""
    if first:  # the competing columns are exactly the non-forced ones
        return torch.cat([forced, take], dim=-1)
    if forced.shape[-1]:
        take = take.clone()
        take[..., : forced.shape[-1]] |= forced
    return take


def select_sequence(values: torch.Tensor, valid: torch.Tensor | None, k: int, min_experts: int = 1,
                    exact_budget: bool = False, fused=None) -> torch.Tensor:
    """Published prefill rule. values: [B, T, C] capped scores, best first. Returns a bool mask [B, T, C].
    fused (TritonSteps): the same cut in a Triton kernel where it serves the tensors; the torch code below is
    its reference (and the compiled CPU kernel's)."""
    batch, tokens, cap = values.shape
    if fused is not None:
        mask = fused.sequence_cut(values, valid, budget_split(k, cap, min_experts, exact_budget))
        if mask is not None:
            return mask
    valid, forced, split = _split_forced(values, valid, k, min_experts, exact_budget)
    first, per_token, scale = split.first, split.per_token, split.scale
    if per_token <= 0 or tokens == 0:
        return _assemble(forced, first, torch.zeros_like(values[..., first:], dtype=torch.bool))
    compete = values[..., first:]
    width = compete.shape[-1]
    if scale == 1:
        # A padding token offers `per_token` slots at +inf and the rest at -inf: the (T*per_token)-th largest
        # of a row is then the (n*per_token)-th largest of its n real tokens, one static k for every row
        # (no host sync to learn how much padding each row has).
        pad_fill = torch.full((width,), NEG_INF, dtype=values.dtype, device=values.device)
        pad_fill[:per_token] = float("inf")
        compete = torch.where(valid.unsqueeze(-1), compete, pad_fill)
        flat = compete.reshape(batch, tokens * width)
        budget = tokens * per_token
        threshold = torch.kthvalue(flat, flat.shape[1] - budget + 1, dim=1, keepdim=True).values
    else:
        # B(n) = floor(n*k + 1/2) is not linear in n, so padding cannot stand in for real tokens' share: each
        # row's cut is read from its sorted values (padding at -inf), at its own rank.
        flat = compete.masked_fill(~valid.unsqueeze(-1), NEG_INF).reshape(batch, tokens * width)
        budget = split.pairs(valid.sum(dim=1, keepdim=True))  # [B, 1]
        ranked = flat.sort(dim=1, descending=True).values
        threshold = ranked.gather(1, (budget - 1).clamp(min=0))
        threshold = threshold.masked_fill(budget == 0, float("inf"))  # a row whose budget is 0 takes nothing
    above = flat > threshold
    # Ties at the cut go to real tokens only: a padding token's -inf slots never take budget from a real
    # token whose candidates are -inf too.
    at = (flat == threshold) & valid.unsqueeze(-1).expand(batch, tokens, width).reshape(batch, tokens * width)
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


def select_causal(values: torch.Tensor, valid: torch.Tensor | None, k: int, min_experts: int = 1,
                  exact_budget: bool = False, history: torch.Tensor | None = None,
                  seen: torch.Tensor | None = None, fused=None) -> torch.Tensor:
    """Streaming rule for a chunk of new tokens. Returns a bool mask [B, L, C].

    values: [B, L, C] capped scores of the new tokens, best first. valid: [B, L] real (non-pad) tokens.
    history: [B, S, C] capped scores of earlier tokens of the same sequences (-inf rows for padding), a
    seqtopk.routing.paged.PagedHistory of them, or None.
    seen: [B] number of real earlier tokens (defaults to the real rows of history, or 0).
    fused (TritonSteps): a one-token step from paged history runs in a Triton kernel where it serves the tensors.
    """
    batch, length, cap = values.shape
    valid, forced, split = _split_forced(values, valid, k, min_experts, exact_budget)
    first, per_token = split.first, split.per_token
    if per_token <= 0 or length == 0:
        return _assemble(forced, first, torch.zeros_like(values[..., first:], dtype=torch.bool))
    if isinstance(history, PagedHistory):
        if fused is not None and length == 1 and seen is not None:
            mask = fused.causal_step(values, valid, history, seen, split)
            if mask is not None:
                return mask
        history = history.gather()
    if seen is None:
        seen = torch.zeros(batch, dtype=torch.long, device=values.device)
        if history is not None and history.shape[1]:
            seen = torch.isfinite(history[..., 0]).sum(dim=1)
    compete = values[..., first:].masked_fill(~valid.unsqueeze(-1), NEG_INF)
    earlier = (history[..., first:].reshape(batch, -1) if history is not None
               else compete.new_empty(batch, 0))
    greater = causal_greater_counts(earlier, compete)  # [B, L, W]
    m = seen.unsqueeze(1) + valid.long().cumsum(dim=1)  # real tokens up to and including each new token
    take = (greater < split.pairs(m).unsqueeze(-1)) & valid.unsqueeze(-1) & torch.isfinite(compete)
    return _assemble(forced, first, take)
