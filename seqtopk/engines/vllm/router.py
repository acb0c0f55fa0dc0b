"""The SeqTopK router for vLLM's fused MoE layers, chosen at layer construction.

vLLM picks one router per MoE layer in `create_fused_moe_router`; we wrap that factory: it builds the stock
router as usual, reads the layer's routing attributes off the factory arguments, maps them onto one of
seqtopk's scoring objects, and returns a SeqTopKRouter in its place. Routing that SeqTopK cannot express
(custom routing functions, hash or zero-expert routing, expert parallel load balancing...) stops the
engine with a clear message instead of falling back to TopK.

The routing itself is seqtopk.routing.router.route, called in a custom op (`seqtopk::vllm_route`): vLLM
traces the model once with dynamo on CPU and would otherwise bake the data-dependent choice into the graph.
The router returns C = cap slots per token with the "repeat_best" convention (an unchosen slot repeats the
token's best expert with weight 0: a valid id; -1 gives wrong sums in vLLM's CPU kernel), as the router
interface requires. In layers without shared experts the experts do not compute those slots: the router
also lists the chosen pairs (`plan`), and the MoE runner runs them as rows of one expert each
(seqtopk.engines.vllm.worker.run_rows), so expert work follows the real choices.
"""

from __future__ import annotations

import inspect
import logging

import torch
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from seqtopk.config import ResolvedConfig, SeqTopKConfig
from seqtopk.engines.vllm import stats
from seqtopk.engines.vllm.registry import WORKER
from seqtopk.engines.vllm.step import capturing, current_step
from seqtopk.kernels import decode_step as fused_gpu
from seqtopk.routing.dispatch import PairPlan, plan_pairs, row_count
from seqtopk.routing.router import route
from seqtopk.routing.rules import TOPK, TokenRules, known_pair_count
from seqtopk.routing.scoring import BiasedScoring, SoftmaxScoring

logger = logging.getLogger("vllm.seqtopk")  # under "vllm" so it shares vLLM's log handlers
WARM_UP = TokenRules.uniform(TOPK)  # forwards that carry no request: any valid choice will do


def scoring_for(args: dict):
    """Map the factory's routing attributes onto a scoring object, or raise ValueError saying why not."""
    unsupported = {
        "custom_routing_function": "a custom routing function (e.g. Phi-MoE sparsemixer, Llama-4)",
        "zero_expert_type": "zero experts",
        "hash_indices_table": "hash routing",
        "bias_vl": "vision routing bias",
        "eplb_state": "expert parallel load balancing",
    }
    for name, what in unsupported.items():
        if args.get(name) is not None:
            raise ValueError(f"SeqTopK does not support {what}")
    if args.get("num_fused_shared_experts"):
        raise ValueError("SeqTopK does not support shared experts fused into routing (ROCm AITER)")
    grouped = bool(args["use_grouped_topk"]) and not (
        (args["num_expert_group"] or 1) <= 1 and (args["topk_group"] or 1) <= 1)
    bias = args.get("e_score_correction_bias")
    scaling = float(args["routed_scaling_factor"])
    func = args["scoring_func"]
    if func not in ("softmax", "sigmoid"):
        raise ValueError(f"SeqTopK does not support scoring_func={func!r}")
    if func == "softmax" and not grouped and bias is None and scaling == 1.0:
        return SoftmaxScoring(renormalize=bool(args["renormalize"]))
    # vLLM's grouped top-k ranks groups by their two best biased scores with a bias, by their best one without
    return BiasedScoring(bias=bias, activation=func, n_group=args["num_expert_group"] if grouped else 1,
                         topk_group=args["topk_group"] if grouped else 1,
                         group_score="top2" if bias is not None else "max",
                         renormalize=bool(args["renormalize"]), scaling=scaling)


class SeqTopKRouter(BaseRouter):
    """Routes one MoE layer by SeqTopK; the stock router it replaces only answers questions about itself."""

    def __init__(self, stock, scoring, cfg: ResolvedConfig, num_experts: int):
        super().__init__(top_k=stock.top_k, global_num_experts=num_experts, eplb_state=None)
        self.stock = stock
        self.scoring = scoring
        self.cfg = cfg
        self.store: torch.Tensor | None = None  # paged history of capped scores, allocated with the KV cache
        self.counts: torch.Tensor | None = None  # stats.COUNTERS, on the device (allocated with the KV cache)
        # Set with the KV cache (worker.attach_state) for layers without shared experts: the experts then run
        # the chosen (token, expert) pairs as rows of one expert each (worker.run_rows), from `plan`.
        self.rows_dispatch = False
        self.plan: PairPlan | None = None
        self.index = WORKER.add_router(self)  # the number the traced graph calls the routing op with
        self.layer_name = f"moe layer {self.index}"  # replaced by the runner's name once the model is built

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return self.stock.routing_method_type

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return torch.ops.seqtopk.vllm_route(router_logits, self.index)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = current_step(logits.shape[0])
        self.plan = None
        if step is None or self.store is None:
            # No sequences in this forward (profiling or warm-up on dummy tokens): cap slots, no plan.
            routed = route(logits, self.scoring, self.cfg, None, WARM_UP, unchosen="repeat_best")
        else:
            # The history records this step's scores at the tokens' KV slots (step.paged.write_slots).
            rules = step.rules(self.cfg)
            graph = capturing(WORKER.source.runner())
            if graph and not fused_gpu.available(logits.device):
                raise RuntimeError("SeqTopK needs Triton to route inside CUDA graphs (pip install triton), or "
                                   "run with --enforce-eager")
            routed = route(logits, self.scoring, self.cfg, step.batch, rules, step.history(self.store),
                           unchosen="repeat_best")
            # Chosen-pairs dispatch sizes its rows on the host, which a graph replay cannot: captured steps
            # run the cap slots (unchosen ones at weight 0).
            if self.rows_dispatch and not graph:
                known = known_pair_count(rules.present[0], self.cfg, logits.shape[0]) if len(rules.present) == 1 else None
                rows = row_count(routed.mask, known)
                self.plan = plan_pairs(routed.ids, routed.weights, routed.mask, rows)
            else:
                rows = routed.mask.numel()  # every cap slot goes through the experts
            stats.record(self, step, routed.mask, routed.ids, rows, graph)
        return routed.weights.float().contiguous(), routed.ids.to(torch.int32).contiguous()


# Registered with torch at import: the op must exist before vLLM traces the model, and this module is
# imported while the model's MoE layers are built.
@torch.library.custom_op("seqtopk::vllm_route", mutates_args=())
def vllm_route(logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return WORKER.routers[layer].route(logits)


@vllm_route.register_fake
def _vllm_route_shape(logits: torch.Tensor, layer: int):
    width = WORKER.routers[layer].cfg.cap
    return (logits.new_empty((logits.shape[0], width), dtype=torch.float32),
            logits.new_empty((logits.shape[0], width), dtype=torch.int32))


def wrap_router_factory(original):
    """create_fused_moe_router, returning a SeqTopKRouter when the engine runs with SeqTopK settings."""
    signature = inspect.signature(original)

    def create_router(*args, **kwargs):
        from vllm.config import get_current_vllm_config

        from seqtopk.engines.vllm.settings import active

        stock = original(*args, **kwargs)
        settings: SeqTopKConfig | None = active(get_current_vllm_config())
        if settings is None:
            return stock
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        import vllm.envs as envs

        if envs.VLLM_MOE_ROUTING_SIMULATION_STRATEGY:
            raise ValueError("SeqTopK cannot run with VLLM_MOE_ROUTING_SIMULATION_STRATEGY set; unset it")
        num_experts = values["global_num_experts"]
        scoring = scoring_for(values)
        cfg = settings.resolve(values["top_k"], scoring.max_candidates(num_experts),
                               where=f"MoE layer {WORKER.next_index}")
        return SeqTopKRouter(stock, scoring, cfg, num_experts)

    create_router.seqtopk_wrapped = True
    return create_router
