"""transformers adapter: SeqTopK routing inside HF MoE models, in place and reversibly.

Three instance-level changes per MoE layer, all undone by unpatch:
- the family's routing call (router.forward, or a block method for a few families): the family's own logits
  (seqtopk.patches), then seqtopk.kernels.paths.route, the one routing call, with the rule seqtopk.routing.rules
  picks for this forward;
- experts.forward: only the chosen (token, expert) pairs run (seqtopk.engines.hf.experts), so compute
  follows the real number of pairs instead of cap slots per token;
- streaming state: the capped scores of every token routed so far, per layer, tied to the KV-cache object
  (seqtopk.engines.hf.state: a new cache starts a new state; beam reordering, batch selection and cropping
  follow the cache), and per row the decode band the compiled CPU kernel answers decode steps from.
Where the routing and the row plan are computed (compiled CPU kernels, Triton, torch) is decided in
seqtopk.kernels.backend, as for vLLM.
Two hooks on the base model hand each forward's sequence view to the routers: it is open from the
pre-hook to the post-hook only (kept past it solely for gradient-checkpointing recomputation).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field

import torch

from seqtopk.config import ResolvedConfig, SeqTopKConfig
from seqtopk.engines.hf.experts import run_chosen, run_plan
from seqtopk.engines.hf.state import ForwardView, RoutingState, follow_cache
from seqtopk.kernels.backend import backend_for
from seqtopk.kernels.paths import plan, route
from seqtopk.routing.router import RouteStats
from seqtopk.routing.rules import CAUSAL, known_pair_count, rule_for
from seqtopk.routing.stats import RoutingStats

logger = logging.getLogger("seqtopk")

_PATCHES: "weakref.WeakKeyDictionary[torch.nn.Module, SeqTopKPatch]" = weakref.WeakKeyDictionary()


class UnsupportedModelError(ValueError):
    """The model has no MoE layer seqtopk can patch."""


# ----------------------------------------------------------------------------------------------- public


def find_patch(model) -> "SeqTopKPatch | None":
    return _PATCHES.get(model)


def require_patch(model) -> "SeqTopKPatch":
    found = find_patch(model)
    if found is None:
        raise ValueError("this model is not patched: call seqtopk.patch(model) first")
    return found


def patch_model(model: torch.nn.Module, config: SeqTopKConfig) -> torch.nn.Module:
    """Validate `config` against every MoE layer of `model`, then (re)install SeqTopK routing."""
    layers = _plan_layers(model, config)  # raises before anything is touched
    previous = _PATCHES.pop(model, None)
    if previous is not None:
        previous.remove()
    patch = SeqTopKPatch(model, config, layers)
    patch.install()
    _PATCHES[model] = patch
    return model


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    found = _PATCHES.pop(model, None)
    if found is not None:
        found.remove()
    return model


# ------------------------------------------------------------------------------------------- planning


@dataclass
class _Layer:
    index: int
    name: str
    block: torch.nn.Module
    family: object
    cfg: ResolvedConfig
    scoring: object
    num_experts: int = 0
    saved: dict = field(default_factory=dict)  # (module, method) -> its own instance-level method, if it had one
    plan: object = None  # the PairPlan of the last routing, consumed by the experts call that follows
    path: str | None = None  # where the last routing ran (seqtopk.kernels.backend), for the experts call


def _plan_layers(model: torch.nn.Module, config: SeqTopKConfig) -> list[_Layer]:
    from seqtopk.patches import family_for_block, supported_summary

    if not isinstance(config, SeqTopKConfig):
        raise TypeError("config must be a SeqTopKConfig")
    layers: list[_Layer] = []
    for name, module in model.named_modules():
        family = family_for_block(module)
        if family is None:
            continue
        if family.unsupported:
            raise UnsupportedModelError(f"{name}: {family.unsupported}. Supported families: {supported_summary()}.")
        router = family.router(module)
        scoring = family.scoring(router, module)
        num_experts = family.num_experts(module)
        cfg = config.resolve(family.top_k(module), scoring.max_candidates(num_experts), where=name)
        layers.append(_Layer(index=len(layers), name=name, block=module, family=family, cfg=cfg, scoring=scoring,
                             num_experts=num_experts))
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE layer seqtopk can patch. Supported families: {supported_summary()}. "
            "To add one, add a row to seqtopk/patches/table.py (routing call, logits, scoring, outputs)."
        )
    return layers


# ---------------------------------------------------------------------------------------------- patch


class SeqTopKPatch:
    def __init__(self, model: torch.nn.Module, config: SeqTopKConfig, layers: list[_Layer]):
        self.model = model
        self.config = config
        self.layers = layers
        self.base = getattr(model, "base_model", model)
        self.stats = RoutingStats([l.name for l in layers], [l.cfg.k for l in layers], [l.cfg.cap for l in layers])
        self._states: "weakref.WeakKeyDictionary[object, RoutingState]" = weakref.WeakKeyDictionary()
        self._view: ForwardView | None = None  # the running forward's view, open from pre- to post-hook
        self._replay: ForwardView | None = None  # the last forward's view, for checkpoint recomputation
        self._pending: RoutingState | None = None
        self._hooks = []
        self._signature = inspect.signature(self.base.forward)
        self._warned: set[str] = set()

    # -- install / remove

    def install(self) -> None:
        for layer in self.layers:
            router = layer.family.router(layer.block)
            experts = layer.family.experts(layer.block)
            method = layer.family.route_method
            for module, name in ((router, method), (experts, "forward")):
                layer.saved[(module, name)] = module.__dict__.get(name)
            setattr(router, method, _bind_router(self, layer, router))
            experts.forward = _bind_experts(layer, experts, layer.saved[(experts, "forward")] or experts.forward)
        self._hooks = [
            self.base.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            # always_call: a forward that raises still closes its view
            self.base.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for layer in self.layers:
            for (module, name), own in layer.saved.items():
                if own is None:
                    module.__dict__.pop(name, None)
                else:
                    setattr(module, name, own)
            layer.saved = {}
        self._view = self._replay = None

    # -- model-level hooks

    def _before_forward(self, module, args, kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        inputs = bound.get("input_ids")
        if inputs is None:
            inputs = bound.get("inputs_embeds")
        self._replay = None
        if inputs is None:
            self._view = None
            return None
        if inputs.dim() < 2:
            raise ValueError(f"seqtopk: input_ids must be [batch, tokens] (inputs_embeds [batch, tokens, hidden]); "
                             f"got shape {tuple(inputs.shape)}: add the batch dimension, e.g. ids.unsqueeze(0)")
        batch, tokens = int(inputs.shape[0]), int(inputs.shape[1])
        device = inputs.device
        cache = bound.get("past_key_values")
        past = cached_length(cache)
        valid, seen = self._padding(bound.get("attention_mask"), batch, tokens, past, device)
        use_cache = bound.get("use_cache")
        if use_cache is None:
            use_cache = getattr(getattr(self.base, "config", None), "use_cache", True)
        # History is kept only when a KV cache will carry the sequence on and its continuation is routed by
        # the causal rule.
        streaming = (rule_for(self.config, fresh=False, generated=True) == CAUSAL
                     and (cache is not None or bool(use_cache)))
        state = None
        if past == 0:
            state = RoutingState() if streaming else None
            self._pending = state
            if cache is not None and state is not None:
                self._attach(cache, state)
        elif streaming:
            state = self._states.get(cache) if cache is not None else None
            state = self._sync_state(state, past, batch)
            if cache is not None and self._states.get(cache) is not state:
                self._attach(cache, state)
        if state is not None:
            state.length = past + tokens  # the layers of this forward write positions past..past+tokens
        self._view = ForwardView(batch, tokens, valid, seen, continuing=past > 0, state=state, start=past)
        return None

    def _after_forward(self, module, args, kwargs, output):
        view = self._view
        completed = output is not None  # None: the forward raised (this hook is always_call)
        if self._pending is not None:
            cache = getattr(output, "past_key_values", None)
            if cache is not None and cache not in self._states:
                self._attach(cache, self._pending)
            self._pending = None
        if view is not None:
            self.stats.end_forward(view.valid, completed=completed)
        if not completed:
            for layer in self.layers:  # a layer that raised between its router and experts left its plan
                layer.plan = None
        self._view = None
        # Gradient-checkpointing recomputation in backward routes again after this hook: it must route
        # exactly as the forward did, so the view stays available for that, and for nothing else.
        if view is not None and self.model.training and getattr(self.model, "is_gradient_checkpointing", False):
            self._replay = view
        return None

    def _padding(self, mask, batch: int, tokens: int, past: int, device):
        if mask is None or mask.dim() != 2:
            if mask is not None:
                self._warn_once("mask", "attention_mask is not 2D; seqtopk treats every token as real")
            valid = torch.ones(batch, tokens, dtype=torch.bool, device=device)
            return valid, torch.full((batch,), past, dtype=torch.long, device=device)
        if mask.shape[0] not in (1, batch) or mask.shape[1] < tokens:
            raise ValueError(f"seqtopk: attention_mask has shape {tuple(mask.shape)} but the input is {batch} x "
                             f"{tokens} tokens after {past} cached ones: pass a mask of [batch, cached + new tokens] "
                             f"(here [{batch}, {past + tokens}]), 1 for real tokens and 0 for padding")
        mask = mask.to(device).expand(batch, -1)  # a one-row mask applies to every row
        valid = mask[:, -tokens:].bool()
        seen = mask[:, :-tokens].long().sum(dim=1) if mask.shape[1] > tokens else torch.zeros(
            batch, dtype=torch.long, device=device)
        return valid, seen

    def _attach(self, cache, state: RoutingState) -> None:
        self._states[cache] = state
        follow_cache(cache, state)

    def _sync_state(self, state: RoutingState | None, past: int, batch: int) -> RoutingState:
        if state is None:
            self._warn_once("nostate", "continuing a KV cache that seqtopk did not route; the streaming rule "
                            "starts its history at the new tokens")
            return RoutingState()
        if state.batch is not None and state.batch != batch:
            self._warn_once("batch", "the batch size changed under a KV cache; restarting the routing history")
            return RoutingState()
        if state.length > past:  # the cache was cropped (assisted decoding, stop rollback)
            state.truncate(past)
        elif state.length < past:
            self._warn_once("short", "the KV cache holds tokens seqtopk did not route; their scores are missing")
        return state

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("seqtopk: %s", message)

    # -- routing of one layer

    def _view_for(self, layer: _Layer, tokens: int, device) -> ForwardView:
        """The view this router call belongs to: the running forward's; during a gradient-checkpointing
        recomputation (backward, after the forward ended), the forward's that routed this layer; else a
        standalone call (the block or router on its own), which routes its tokens as one sequence."""
        view = self._view
        if view is None and torch.is_grad_enabled():
            replay = self._replay
            if replay is not None and layer.index in replay.routed_layers:
                view = replay
        if view is None or view.batch * view.tokens != tokens:
            return ForwardView.standalone(tokens, device)
        return view

    def route_layer(self, layer: _Layer, router, *args):
        """The family's routing call, with its own arguments (hidden states first; a few block methods take
        the logits themselves)."""
        logits = layer.family.logits(router, *args)
        dtype = args[0].dtype
        n = logits.shape[0]
        view = self._view_for(layer, n, logits.device)
        cfg = layer.cfg
        rules = view.rules(cfg)
        # Once per forward and layer the history and the statistics are written: gradient-checkpointing
        # recomputation routes again (identically) and must not extend the history or count twice.
        first = layer.index not in view.routed_layers
        view.routed_layers.add(layer.index)
        stats = RouteStats(histogram=self.stats.histogram_row(layer.index, logits.device)) if first else None
        layer.path = path = backend_for(logits.device)  # asked once per layer call, handed to every step below
        routed = route(logits, layer.scoring, cfg, view.layout, rules, view.history(layer.index, cfg.cap, logits.device),
                       unchosen="drop", stats=stats, record=first, path=path)
        if first and self.stats.tracing:
            shape = (view.batch, view.tokens, cfg.cap)
            self.stats.trace(layer.index, routed.ids.view(shape), routed.values.view(shape), routed.mask.view(shape))
        layer.plan = None
        if cfg.cap > cfg.k:  # with cap == k every real slot is chosen: stock dispatch, bit for bit
            (rule,) = rules.present  # one rule for the whole forward
            layer.plan = plan(routed.ids, routed.weights, routed.mask, layer.num_experts,
                              exact_total=known_pair_count(rule, cfg, view.tokens, view.batch), path=path)
        return layer.family.outputs(router, logits, routed.weights, routed.ids, dtype)


def cached_length(cache) -> int:
    """Tokens a KV cache already holds. Cache.get_seq_length() reads layer 0, which in hybrid caches (MiniMax's)
    may be a linear-attention layer that counts nothing: the longest layer is the sequence's length."""
    if cache is None:
        return 0
    lengths = [int(cache.get_seq_length())]
    if lengths[0]:  # layer 0 counts tokens: that is the length (no walk over the layers on every forward)
        return lengths[0]
    for layer in getattr(cache, "layers", ()):
        try:
            lengths.append(int(layer.get_seq_length()))
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            pass  # a layer kind without a token count (linear attention state)
    return max(lengths)


def _bind_router(patch: SeqTopKPatch, layer: _Layer, router):
    def routing_call(*args, **kwargs):
        return patch.route_layer(layer, router, *args, *kwargs.values())

    return routing_call


def _bind_experts(layer: _Layer, experts, original):
    """Run the experts on chosen (token, expert) rows only; unchosen slots (-1) cost nothing."""

    def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        plan, layer.plan = layer.plan, None
        if args or kwargs:
            return original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if hidden_states.dim() > 2:  # DBRX hands its experts [batch, tokens, hidden]
            flat = forward_flat(hidden_states.reshape(-1, hidden_states.shape[-1]), top_k_index, top_k_weights, plan)
            return flat.view(hidden_states.shape)
        return forward_flat(hidden_states, top_k_index, top_k_weights, plan)

    def forward_flat(hidden_states, top_k_index, top_k_weights, plan):
        if plan is not None and plan.tokens == hidden_states.shape[0]:
            return run_plan(experts, original, hidden_states, plan, layer.path)
        if not bool((top_k_index < 0).any()):
            return original(hidden_states, top_k_index, top_k_weights)
        return run_chosen(experts, original, hidden_states, top_k_index, top_k_weights, layer.path)

    return forward
