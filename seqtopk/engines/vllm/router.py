"""The SeqTopK router for vLLM's fused MoE layers, chosen at layer construction, and the op that runs a layer.

vLLM picks one router per MoE layer in `create_fused_moe_router`; we wrap that factory: it builds the stock
router as usual, reads the layer's routing attributes off the factory arguments, maps them onto one of
seqtopk's scoring objects, and returns a SeqTopKRouter in its place. Routing that SeqTopK cannot express
(custom routing functions, hash or zero-expert routing, expert parallel load balancing...) stops the
engine with a clear message instead of falling back to TopK.

On CPU engines with the compiled kernels, a softmax-scored layer (cap > k) runs as one compiled op,
`seqtopk_cpu::moe_layer` (seqtopk/kernels/cpu/moe.cpp: candidates, routing, vLLM's CPU experts kernel on the
chosen pairs, combine, counters), which vLLM's traced graph calls itself; its settings are handed over here
(`configure_whole_layer`) and its state with the KV cache (seqtopk.engines.vllm.startup.attach_state).
Everywhere else a layer's routed experts run as one opaque custom op, `seqtopk::moe(hidden_states, router_logits,
layer)`, called by the MoE runner in place of its router + experts call (seqtopk.engines.vllm.runner): vLLM
traces the model once with dynamo on CPU (and piecewise on GPU), and whatever the traced graph depends on must
flow through an op's tensors, not Python attributes set by another op. Inside the op, with each step's own
layout: the routing (seqtopk.kernels.paths.route: every rule, the history write and the statistics in one
call on CPU), then only the chosen (token, expert) pairs through the layer's own fused-MoE kernel, and the
combine. On CPU the kernel takes a fixed number of experts per token, so tokens are grouped by how many they
chose (seqtopk.kernels.paths.count_groups): one kernel call per group, with the token's own weighted sum
done by the kernel in float32. Elsewhere the pairs run as rows of one expert each and are combined after.
The rows the experts computed are counted inside the op (a host count, or the device `counts` in a CUDA
graph, whose replays run no Python), read by `seqtopk_stats` and /metrics.
Shared experts stay outside the op, computed by the runner as vLLM computes them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

import torch
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from seqtopk.config import ResolvedConfig, SeqTopKConfig
from seqtopk.engines.vllm import stats
from seqtopk.engines.vllm.registry import WORKER
from seqtopk.engines.vllm.step import capturing, current_step
from seqtopk.kernels import compiled, ops
from seqtopk.kernels import decode_step as fused_gpu
from seqtopk.kernels.backend import CPU_KERNELS, backend_for
from seqtopk.kernels.paths import combine, count_groups, gather_rows, plan, route, scatter_rows
from seqtopk.routing.dispatch import SLOT_COST
from seqtopk.routing.router import RouteStats
from seqtopk.routing.rules import TOPK, TokenRules, known_pair_count
from seqtopk.routing.scoring import SoftmaxScoring, build_scoring

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
    func = args["scoring_func"]
    if func not in ("softmax", "sigmoid"):
        raise ValueError(f"SeqTopK does not support scoring_func={func!r}")
    grouped = bool(args["use_grouped_topk"])
    bias = args.get("e_score_correction_bias")
    # vLLM's grouped top-k ranks groups by their two best biased scores with a bias, by their best one without
    return build_scoring(func, bias=bias, n_group=(args["num_expert_group"] or 1) if grouped else 1,
                         topk_group=(args["topk_group"] or 1) if grouped else 1,
                         group_score="top2" if bias is not None else "max",
                         renormalize=bool(args["renormalize"]), scaling=float(args["routed_scaling_factor"]))


def expert_layout() -> str:
    """How the compiled layer hands the chosen pairs to the experts kernel (SEQTOPK_MOE_LAYOUT: auto, rows or
    groups; seqtopk/kernels/cpu/moe.cpp). Every layout computes the same pairs."""
    layout = os.environ.get("SEQTOPK_MOE_LAYOUT", "auto")
    if layout not in ops.LAYOUTS:
        raise ValueError(f"SEQTOPK_MOE_LAYOUT must be one of {ops.LAYOUTS}, got {layout!r}")
    return layout


def whole_layer_refusal(scoring, cfg: ResolvedConfig) -> str | None:
    """Why a layer cannot run as one compiled op (seqtopk_cpu::moe_layer), or None when it can: vLLM on CPU with
    the compiled kernels, a plain softmax-scored family whose weights the op computes (cap > k: at cap == k the
    family's own TopK weights must come out bit for bit) and unquantized experts. SEQTOPK_WHOLE_LAYER=0
    switches it off (the Python op runs instead) in graphs traced from then on: run with
    VLLM_DISABLE_COMPILE_CACHE=1, as vLLM's compile cache does not key on it."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "not a CPU engine"
    if not compiled.load():
        return compiled.missing()
    if type(scoring) is not SoftmaxScoring or cfg.cap <= cfg.k:
        return "the family's scoring is not plain softmax with cap > k"
    if get_current_vllm_config().quant_config is not None:
        return "quantized experts"
    return None


def whole_layer_experts(experts) -> tuple[str, str] | None:
    """(activation, isa) when the layer's experts are vLLM's unquantized CPU kernel that the compiled op calls
    (`_C::cpu_fused_moe` on prepacked weights), else None."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        fused = experts.quant_method.moe_kernel.fused_experts
    except (ImportError, AttributeError):
        return None
    if (not isinstance(fused, CPUUnquantizedExperts) or getattr(fused, "_use_zentorch", False)
            or experts.expert_map is not None or experts.apply_router_weight_on_input):
        return None
    return experts.activation.value, fused.isa


# vLLM's CPU fused-MoE kernel, per call: a fixed cost, in expert rows (the call's Python, thread fork-joins and
# buffers measured ~0.2 ms, about 20 MFLOP of expert work at one core's rate), and re-reading the weights of the
# experts it touches (~4 rows of work per expert at ~20 GB/s and ~80 GFLOP/s). See evals/results/vllm_bench_cpu.json.
CALL_FLOPS = 2e7
RELOAD_ROWS = 4.0


class SeqTopKRouter(BaseRouter):
    """Routes one MoE layer by SeqTopK; the stock router it replaces only answers questions about itself."""

    def __init__(self, stock, scoring, cfg: ResolvedConfig, num_experts: int):
        super().__init__(top_k=stock.top_k, global_num_experts=num_experts, eplb_state=None)
        self.stock = stock
        self.scoring = scoring
        self.cfg = cfg
        self.num_experts = num_experts
        self.store: torch.Tensor | None = None  # paged history of capped scores, allocated with the KV cache
        self.bands: torch.Tensor | None = None  # decode bands, one per request slot (registry.BandSlots)
        self.counts: torch.Tensor | None = None  # stats.COUNTERS, on the device (allocated with the KV cache)
        self.host_rows = 0  # expert rows of eagerly run steps (a host int: no device op per layer for it)
        self.call_rows = 16.0  # per-call cost of the layer's kernel in rows (set with the KV cache)
        self.index = WORKER.add_router(self)  # the number the traced graph calls the MoE op with
        self.layer_name = f"moe layer {self.index}"  # replaced by the runner's name once the model is built
        self.runner = None  # the MoE runner this router belongs to (found on first use)
        self._experts_call = None
        # The whole layer as one compiled op (seqtopk_cpu::moe_layer), decided before vLLM traces the model. The
        # op is configured wherever it can run, even when switched off: a compiled graph vLLM cached with it in
        # an earlier start still finds its layer.
        self.whole_layer_ready = whole_layer_refusal(scoring, cfg) is None
        self.whole_layer = self.whole_layer_ready and os.environ.get("SEQTOPK_WHOLE_LAYER", "1") != "0"
        if self.whole_layer_ready:
            self.configure_whole_layer()

    def configure_whole_layer(self) -> None:
        """The compiled layer's settings (again once the layer's shape sets its kernel's call cost)."""
        ops.register_fakes()
        ops.moe_configure(self.index, num_experts=self.num_experts, cap=self.cfg.cap,
                          split=self.cfg.split,
                          k=int(self.cfg.k),
                          weight_mode=self.scoring.kernel_weights, layout=expert_layout(),
                          call_rows=self.call_rows, reload_rows=RELOAD_ROWS, slot_cost=SLOT_COST)

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return self.stock.routing_method_type

    def moe_runner(self):
        """The MoE runner this router belongs to, found once among the forward context's layers."""
        if self.runner is None:
            from vllm.forward_context import get_forward_context

            layers = get_forward_context().no_compile_layers
            self.runner = next(layer for layer in layers.values() if getattr(layer, "router", None) is self)
        return self.runner

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        raise RuntimeError("a SeqTopK layer routes inside its seqtopk::moe op, called by SeqTopK's MoE runner "
                           "(seqtopk.engines.vllm.runner); this layer runs under another runner class (a model's "
                           "own MoERunner subclass, e.g. vLLM's Transformers backend), which SeqTopK does not support")

    def forward(self, hidden_states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The layer's routed experts: route, run the chosen pairs, combine. Runs inside seqtopk::moe."""
        step = current_step(logits.shape[0])
        experts = self.moe_runner().routed_experts
        path = backend_for(logits.device)  # asked once per layer call, handed to every step below
        if step is None or self.store is None:
            # No sequences in this forward (profiling or warm-up on dummy tokens): plain TopK, no state, no counts.
            routed = route(logits, self.scoring, self.cfg, None, WARM_UP, unchosen="repeat_best", record=False,
                           path=path)
            return self._run_groups(experts, hidden_states, routed, path)[0]
        rules = step.rules(self.cfg)
        graph = capturing(WORKER.source.runner())
        if graph and not fused_gpu.available(logits.device):
            raise RuntimeError("SeqTopK needs Triton to route inside CUDA graphs (pip install triton), or "
                               "run with --enforce-eager")
        routed = route(logits, self.scoring, self.cfg, step.batch, rules, step.history(self.store, self.bands),
                       unchosen="repeat_best", stats=RouteStats(token_class=step.token_class(), counters=self.counts),
                       path=path)
        if graph:
            out = self._run_captured(experts, hidden_states, routed)
        elif path == CPU_KERNELS:
            out, rows = self._run_groups(experts, hidden_states, routed, path)
            self.host_rows += rows
        else:
            single = len(rules.present) == 1
            known = known_pair_count(rules.present[0], self.cfg, logits.shape[0], rows=None) if single else None
            out, rows = self._run_rows(experts, hidden_states, routed, known, path)
            self.host_rows += rows
        stats.after_step(self, step, routed, graph)
        return out

    def _run_captured(self, experts, hidden: torch.Tensor, routed) -> torch.Tensor:
        """A step captured in a CUDA graph keeps its shapes: every token passes cap slots. Where vLLM's Triton
        experts skip id -1 (pad_aware_expert_map), the unchosen slots carry -1 and cost nothing; elsewhere they
        repeat a chosen expert at weight 0 and are computed. Replays run no Python: the captured add counts rows."""
        identity = pad_aware_expert_map(experts, hidden.device)
        if identity is None:
            self.counts[4] += routed.ids.numel()
            return experts.forward_modular(x=hidden, topk_weights=routed.weights.float(),
                                           topk_ids=routed.ids.to(torch.int32))
        self.counts[4] += routed.mask.sum()
        return experts.quant_method.moe_kernel.apply(
            hidden_states=hidden, w1=experts.w13_weight, w2=experts.w2_weight,
            topk_ids=routed.ids.masked_fill(~routed.mask, -1).to(torch.int32),
            topk_weights=routed.weights.float().masked_fill(~routed.mask, 0.0), activation=experts.activation,
            global_num_experts=experts.global_num_experts, expert_map=identity,
            apply_router_weight_on_input=experts.apply_router_weight_on_input)

    def _run_groups(self, experts, hidden: torch.Tensor, routed, path: str) -> tuple[torch.Tensor, int]:
        """Tokens grouped by their number of chosen experts, one kernel call per group (count_groups)."""
        groups = count_groups(routed.ids, routed.weights, routed.mask, self.num_experts, self.call_rows, RELOAD_ROWS,
                              path=path)
        tokens = hidden.shape[0]
        rows = sum(group[1].numel() for group in groups)
        call = self.experts_call(experts)
        if len(groups) == 1 and groups[0][0].numel() == tokens:  # every token, in order: no copies
            _, ids, weights = groups[0]
            return call(hidden, weights, ids), rows
        out = hidden.new_zeros(hidden.shape) if sum(g[0].numel() for g in groups) < tokens else torch.empty_like(hidden)
        for members, ids, weights in groups:
            scatter_rows(out, members, call(gather_rows(hidden, members, path), weights, ids), path)
        return out, rows

    def experts_call(self, experts):
        """How this layer's experts are called on (x, topk_weights, topk_ids): through vLLM's modular kernel
        (forward_modular), or, for vLLM's unquantized CPU experts, straight through their own `apply`, which is
        what the modular kernel ends in there (its prepare and finalize steps do nothing on that path), without
        ~0.1 ms of Python per call. Decided once."""
        if self._experts_call is None:
            self._experts_call = lambda x, w, i: experts.forward_modular(x=x, topk_weights=w, topk_ids=i)
            try:
                from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

                fused = experts.quant_method.moe_kernel.fused_experts
                # (with zentorch the same `apply` runs zentorch's kernel, as the modular path would)
                direct = (type(fused) in (CPUUnquantizedExperts, *CPUUnquantizedExperts.__subclasses__())
                          and experts.expert_map is None
                          and not experts.apply_router_weight_on_input)
            except (ImportError, AttributeError):
                direct = False
            if direct:
                def call(x, weights, ids):
                    out = torch.empty_like(x)
                    fused.apply(output=out, hidden_states=x, w1=experts.w13_weight, w2=experts.w2_weight,
                                topk_weights=weights, topk_ids=ids, activation=experts.activation,
                                global_num_experts=experts.global_num_experts, expert_map=None, a1q_scale=None,
                                a2_scale=None, workspace13=None, workspace2=None, expert_tokens_meta=None,
                                apply_router_weight_on_input=False)
                    return out

                self._experts_call = call
        return self._experts_call

    def _run_rows(self, experts, hidden: torch.Tensor, routed, known: int | None, path: str) -> tuple[torch.Tensor, int]:
        """Each chosen pair as a row of one expert through the kernel with top-1, then the weighted sum per token
        (a GPU's grouped kernel takes rows of one expert at full speed)."""
        pairs = plan(routed.ids, routed.weights, routed.mask, self.num_experts, exact_total=known, path=path)
        ones = torch.ones(pairs.rows, 1, dtype=torch.float32, device=hidden.device)
        rows = experts.forward_modular(x=gather_rows(hidden, pairs.token, path), topk_weights=ones,
                                       topk_ids=pairs.expert.to(torch.int32).unsqueeze(1))
        return combine(rows, pairs, path).to(hidden.dtype), pairs.rows


_IDENTITY_MAPS: dict = {}


def pad_aware_expert_map(experts, device: torch.device) -> torch.Tensor | None:
    """An identity expert map for a CUDA layer whose experts skip id -1 once given a map (skips_minus_one), else
    None. The map sends every expert to itself, so no chosen pair changes."""
    if device.type != "cuda" or not skips_minus_one(experts):
        return None
    key = (experts.global_num_experts, device)
    if key not in _IDENTITY_MAPS:
        _IDENTITY_MAPS[key] = torch.arange(experts.global_num_experts, dtype=torch.int32, device=device)
    return _IDENTITY_MAPS[key]


def skips_minus_one(experts) -> bool:
    """Whether the layer's experts, called with an expert map, compute nothing for id -1 and sum it as zero.

    vLLM's unquantized Triton experts (`experts/triton_moe.py`, `TritonExperts.apply`) drop ids < 0 when they
    align the pairs and sum only the valid slots (`moe_sum` with topk_ids and expert_map), but only when the
    call carries an expert map, no LoRA and no globally scaled quantized activation (`skip_invalid`); without a
    map the sum adds workspace rows never written. Other experts (FlashInfer, AITER, quantized kernels, the
    CPU kernel, which ignores expert_map) and layers with a real map (expert parallelism) do not qualify.
    Checked against vLLM's sources by symbols.SYMBOLS; not run on a GPU here (docs/vllm.md)."""
    if experts.expert_map is not None:
        return False
    try:
        from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

        fused = experts.quant_method.moe_kernel.fused_experts
    except (ImportError, AttributeError):
        return False
    return (type(fused) is TritonExperts and fused.quant_dtype is None
            and getattr(fused, "_lora_context", None) is None)


# Registered with torch at import: the op must exist before vLLM traces the model, and this module is
# imported while the model's MoE layers are built.
@torch.library.custom_op("seqtopk::moe", mutates_args=())
def moe(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer: int) -> torch.Tensor:
    return WORKER.routers[layer].forward(hidden_states, router_logits)


@moe.register_fake
def _moe_shape(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer: int):
    return torch.empty_like(hidden_states)


def wrap_router_factory(original):
    """create_fused_moe_router, returning a SeqTopKRouter when the engine runs with SeqTopK settings."""
    signature = inspect.signature(original)

    @functools.wraps(original)  # keeps vLLM's signature readable (compat.check_live)
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

    return create_router
