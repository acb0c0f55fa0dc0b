"""Rule-level verification, shared by the transformers and vLLM tests and the differential checker: the torch rules
applied to the capped scores an engine itself computed must choose the slots the engine chose, whatever its
numerics. `routings` and `rule_mismatches` read a vLLM worker's trace, one routing of a sequence at a time (a
preempted request is routed again from position 0)."""

from __future__ import annotations

import torch


def causal_mismatches(values: torch.Tensor, chosen: torch.Tensor, cfg, k: float | None = None) -> list[int]:
    """Positions of one sequence where seqtopk.routing.rules.select_causal, applied to its capped scores
    `values` [T, C] (best first, in position order) with the layer's resolved settings `cfg`, chooses other
    slots than `chosen` [T, C]. k: another budget (a deliberately wrong rule, to show the check can fail)."""
    expected = select_causal_all(values, cfg, cfg.k if k is None else k)
    return (expected != chosen).any(-1).nonzero().flatten().tolist()


def routings(records: list) -> dict:
    """vLLM worker trace records (collective_rpc("seqtopk_trace", ...)) -> {(engine request id, layer):
    [incarnation, ...]} in order of arrival. An incarnation is one routing of the sequence from position 0 (its
    first prefill, or a recompute after preemption): a list of forwards, each {position: (capped scores, chosen
    slots)} of the request's tokens in that forward."""
    out: dict = {}
    for record in records:
        forwards: dict = {}
        for row, position, values, mask in zip(record["row"], record["position"], record["values"], record["mask"]):
            forwards.setdefault(record["req_ids"][row], {})[position] = (values, mask)
        for req, tokens in forwards.items():
            runs = out.setdefault((req, record["layer"]), [])
            if 0 in tokens or not runs:
                runs.append([])
            runs[-1].append(tokens)
    return out


def rule_mismatches(incarnation: list, prompt_len: int, cfg, k: float | None = None) -> tuple[int, list[int]]:
    """Check one incarnation of a served sequence against seqtopk.routing.rules, each token by the rule the engine
    is asked to apply (rules.rule_for): prompt tokens routed in its first forward start the routing (the prefill
    rule, over those tokens together), generated tokens (positions >= prompt_len, a recompute's re-prefilled ones
    included) follow the decode rule, any other token the streaming rule over the incarnation's scores up to it.
    k: another budget (a wrong rule: the check must then fail). Returns (tokens checked, positions that differ)."""
    from seqtopk.routing.rules import CAUSAL, SEQUENCE, rule_for, select_sequence, topk_mask

    budget = cfg.k if k is None else k
    tokens = {p: token for forward in incarnation for p, token in forward.items()}
    positions = sorted(tokens)
    assert positions == list(range(len(positions))), "an incarnation must route each position once, from 0"
    assert sum(len(forward) for forward in incarnation) == len(positions), "a position routed twice"
    values = torch.tensor([tokens[p][0] for p in positions], dtype=torch.float32)
    chosen = torch.tensor([tokens[p][1] for p in positions], dtype=torch.bool)
    fresh = [p for p in sorted(incarnation[0]) if p < prompt_len]
    expected = select_causal_all(values, cfg, budget)
    if fresh and rule_for(cfg, fresh=True, generated=False) == SEQUENCE:
        expected[: len(fresh)] = select_sequence(values[None, : len(fresh)], None, budget, cfg.min_experts,
                                                 cfg.exact_budget)[0]
    if len(positions) > prompt_len and rule_for(cfg, fresh=False, generated=True) != CAUSAL:
        expected[prompt_len:] = topk_mask(values[prompt_len:], int(budget))
    return len(positions), (expected != chosen).any(-1).nonzero().flatten().tolist()


def select_causal_all(values: torch.Tensor, cfg, k: float) -> torch.Tensor:
    """select_causal over one whole sequence's capped scores [T, C] -> chosen slots [T, C]."""
    from seqtopk.routing.rules import select_causal

    return select_causal(values[None], None, k, cfg.min_experts, cfg.exact_budget)[0]
