"""Small-scale reproduction of SeqTopK's quality claim (SPEC 1.4), on tinyshakespeare, on CPU.

The paper's gains come from a short fine-tune (100-200 steps) with SeqTopK on, growing with sparsity;
switching routing on without fine-tuning was slightly worse. At a scale this machine allows:
1. pretrain a tiny OLMoE-style model (byte-level, 16 experts) with stock TopK;
2. from that checkpoint, fine-tune the same number of steps with stock TopK (control) and with SeqTopK;
3. evaluate held-out loss (last 10% of the text, never trained on) for: the pretrained model, the TopK
   fine-tune, SeqTopK switched on without fine-tuning, the SeqTopK fine-tune (published defaults: the
   minimum of one expert comes on top of the budget), and a SeqTopK fine-tune held to exactly T*k pairs
   (exact budget, no minimum) for a comparison at equal compute; each with its measured experts per
   token. SeqTopK is evaluated with the causal rule (no information from later tokens).
Repeated for k=2 and k=1, and for each seed (model init and batch order). Reports the mean and spread
over seeds, and each SeqTopK fine-tune's paired difference from the TopK fine-tune of the same seed.
Writes evals/results/repro_tiny_finetune.json and .png.

    python evals/repro_tiny_finetune.py [--pretrain-steps 400] [--finetune-steps 150] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import seqtopk
from seqtopk.paths import shared_path
from seqtopk.testing.tiny import build_tokenizer

SEQ_LEN = 128


def build_model(k: int, seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(vocab_size=320, hidden_size=128, intermediate_size=64, num_experts=16,
                         num_experts_per_tok=k, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=SEQ_LEN, norm_topk_prob=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, router_aux_loss_coef=0.01, output_router_logits=False)
    torch.manual_seed(seed)
    return OlmoeForCausalLM(config)


def batches(ids: torch.Tensor, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + SEQ_LEN] for s in starts.tolist()])


def train(model, ids, steps, lr, seed, desc):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    losses = []
    for x in tqdm(batches(ids, 16, steps, seed), total=steps, desc=desc, leave=False):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def held_out_loss(model, ids) -> float:
    blocks = ids[: (len(ids) // SEQ_LEN) * SEQ_LEN].view(-1, SEQ_LEN)
    total, count = 0.0, 0
    for i in range(0, len(blocks), 32):
        x = blocks[i:i + 32]
        total += model(input_ids=x, labels=x).loss.item() * x.numel()
        count += x.numel()
    return total / count


def experts_per_token(model, ids) -> float:
    if not seqtopk.is_patched(model):
        return float(model.config.num_experts_per_tok)
    seqtopk.reset_routing_stats(model)
    held_out_loss(model, ids[: 64 * SEQ_LEN])
    return seqtopk.routing_stats(model).mean_experts_per_token


def run_budget(k, seed, train_ids, test_ids, args):
    """One pretrain + fine-tunes for budget k. Seed s: model init s, pretrain batches 2s, fine-tune batches 2s+1."""
    base = build_model(k, seed)
    pre_losses = train(base, train_ids, args.pretrain_steps, 3e-3, 2 * seed, f"pretrain k={k} seed={seed}")
    state = {n: t.clone() for n, t in base.state_dict().items()}
    rows = {}

    def evaluate(name, model):
        rows[name] = {"held_out_loss": held_out_loss(model, test_ids), "experts_per_token": experts_per_token(model, test_ids)}
        print(f"k={k} seed={seed} {name:<28} loss {rows[name]['held_out_loss']:.4f}  experts/token {rows[name]['experts_per_token']:.3f}")

    evaluate("pretrained (TopK)", base)
    topk = build_model(k)
    topk.load_state_dict(state)
    train(topk, train_ids, args.finetune_steps, 1e-3, 2 * seed + 1, f"finetune TopK k={k}")
    evaluate("TopK fine-tune", topk)
    switched = build_model(k)
    switched.load_state_dict(state)
    seqtopk.patch(switched, cap=k + 2, prefill="causal")
    evaluate("SeqTopK switched on", switched)
    for name, settings in (("SeqTopK fine-tune", {}),
                           ("SeqTopK fine-tune, exact T*k", {"exact_budget": True, "min_experts": 0})):
        tuned = build_model(k)
        tuned.load_state_dict(state)
        seqtopk.patch(tuned, cap=k + 2, **settings)  # the published (sequence) rule while training
        train(tuned, train_ids, args.finetune_steps, 1e-3, 2 * seed + 1, f"{name} k={k}")
        seqtopk.patch(tuned, cap=k + 2, prefill="causal", **settings)  # honest evaluation
        evaluate(name, tuned)
    return {"pretrain_final_loss": sum(pre_losses[-20:]) / 20, "results": rows}


def summarise(runs: list[dict]) -> dict:
    """Mean and sample std over seeds per variant, plus each fine-tune's paired difference from TopK's."""
    def stats(values):
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        return mean, std

    results = {}
    for name in runs[0]["results"]:
        losses = [r["results"][name]["held_out_loss"] for r in runs]
        experts = [r["results"][name]["experts_per_token"] for r in runs]
        mean, std = stats(losses)
        results[name] = {"held_out_loss": mean, "held_out_loss_std": std, "held_out_loss_per_seed": losses,
                         "experts_per_token": sum(experts) / len(experts)}
        if name.startswith("SeqTopK fine-tune"):
            diffs = [r["results"][name]["held_out_loss"] - r["results"]["TopK fine-tune"]["held_out_loss"] for r in runs]
            d_mean, d_std = stats(diffs)
            results[name].update(minus_topk_finetune=d_mean, minus_topk_finetune_std=d_std,
                                 minus_topk_finetune_per_seed=diffs)
    return {"pretrain_final_loss": sum(r["pretrain_final_loss"] for r in runs) / len(runs), "results": results}


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["budgets"]), figsize=(6 * len(result["budgets"]), 4), squeeze=False)
    axes = axes[0]
    for ax, (k, data) in zip(axes, result["budgets"].items()):
        names = list(data["results"])
        losses = [data["results"][n]["held_out_loss"] for n in names]
        spread = [data["results"][n].get("held_out_loss_std", 0.0) for n in names]
        ax.bar(range(len(names)), losses, yerr=spread, capsize=3, color=["gray", "C0", "C1", "C2", "C3"][: len(names)])
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        low = min(losses)
        ax.set_ylim(low - 0.1, max(losses) + 0.05)
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_title(f"k={k}")
        for i, n in enumerate(names):
            ax.text(i, losses[i], f"{data['results'][n]['experts_per_token']:.2f} e/t", ha="center", va="bottom", fontsize=8)
    fig.suptitle("tiny OLMoE-style MoE on tinyshakespeare: TopK vs SeqTopK fine-tune, mean and std over seeds "
                 "(e/t = experts per token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--budgets", default="2,1")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; results report mean and spread")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "repro_tiny_finetune.json"))
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 beside another job: two threads spinning against it took a "
                             "training step from 0.2 s to 5 s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = shared_path("data", "tinyshakespeare", "input.txt").read_text()
    ids = torch.tensor(build_tokenizer()(text)["input_ids"])
    split = int(len(ids) * 0.9)
    train_ids, test_ids = ids[:split], ids[split:]
    start = time.time()
    result = {"setup": {"pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                        "batch": 16, "seq_len": SEQ_LEN, "experts": 16, "train_tokens": int(len(train_ids)),
                        "held_out_tokens": int(len(test_ids)), "cap": "k+2",
                        "training_rule": "sequence", "evaluation_rule": "causal"},
              "budgets": {}}
    seeds = [int(x) for x in args.seeds.split(",")]
    result["setup"]["seeds"] = seeds
    for k in [int(b) for b in args.budgets.split(",")]:
        runs = [run_budget(k, seed, train_ids, test_ids, args) for seed in seeds]
        result["budgets"][str(k)] = summarise(runs)
    result["seconds"] = round(time.time() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']} s")


if __name__ == "__main__":
    main()
