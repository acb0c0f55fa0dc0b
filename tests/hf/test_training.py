"""Training with SeqTopK on: gradients, gradient checkpointing, and a short Trainer fine-tune."""

import pytest
import torch

import seqtopk


def lm_batch(tok, texts):
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {**enc, "labels": labels}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# Every family is checked in tests/hf/test_families.py; the checks here name the parameters.
@pytest.mark.parametrize("family", ["deepseek_v3"])
def test_gradients_reach_router_and_experts(load_tiny, family):
    model, tok = load_tiny(family)
    model.train()
    seqtopk.patch(model)
    batch = lm_batch(tok, ["sequence level routing spends the budget", "hard tokens take more"])
    model(**batch).loss.backward()
    g = grads(model)
    router = [n for n in g if n.endswith(("gate.weight", "router.weight")) and "shared" not in n]
    experts = [n for n in g if ".experts." in n]
    assert router and all(g[n].abs().sum() > 0 for n in router)
    assert experts and all(g[n].abs().sum() > 0 for n in experts)


def test_gradient_checkpointing_routes_the_same(load_tiny):
    model, tok = load_tiny("olmoe")
    model.train()
    seqtopk.patch(model)
    batch = lm_batch(tok, ["checkpointing recomputes every layer in backward", "short"])
    model(**batch).loss.backward()
    plain = grads(model)
    model.zero_grad()
    seqtopk.reset_routing_stats(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(**batch).loss.backward()
    stats = seqtopk.routing_stats(model)
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    real = int(batch["attention_mask"].sum())
    assert stats.tokens == [real] * model.config.num_hidden_layers, "recomputation must not count twice"


def test_trainer_fine_tune_lowers_loss(load_tiny, shared_data, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tok = load_tiny("qwen3_moe")
    seqtopk.patch(model, cap=4)
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:40_000]
    ids = tok(text)["input_ids"]
    blocks = [ids[i:i + 64] for i in range(0, len(ids) - 64, 64)][:256]
    train = Dataset.from_dict({"input_ids": blocks})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=5, report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5, losses
    assert seqtopk.is_patched(model)
    stats = seqtopk.routing_stats(model)  # every training token routed once per layer, and by the sequence
    assert stats.tokens == [40 * 8 * 64] * model.config.num_hidden_layers
    assert all(min(j for j, n in enumerate(row) if n) < 2 < max(j for j, n in enumerate(row) if n)
               for row in stats.histogram), stats.histogram
