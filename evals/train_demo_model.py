"""Train the MoE language model that `seqtopk demo` ships with, and write it into the package.

The model of evals/repro_tiny_finetune.py (OLMoE-style, 4 layers, hidden 128, 16 experts, top-2, byte-level
tokens, 128-token context), trained on tinyshakespeare's first 90% (the last 10% stays held out):
1. pretrained with stock TopK (--pretrain-steps, lr 3e-3);
2. fine-tuned with SeqTopK on (--finetune-steps, lr 1e-3; cap 4, the published sequence rule while training),
   as the paper does (SPEC 1.4: gains come from a short fine-tune with SeqTopK on).
Then it measures on held-out text the loss under stock TopK and under SeqTopK (causal rule), and the Spearman
correlation of experts per token with token loss and router entropy (seqtopk.demo.held_out_figures), saves
the weights in float16 (a few MB) with the tokenizer and a card (seqtopk_demo.json) into seqtopk/demo/model/,
and records the run in evals/results/demo_model.json. Seeded: a rerun reproduces it.

    python evals/train_demo_model.py [--pretrain-steps 2000] [--finetune-steps 300] [--out seqtopk/demo/model]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import seqtopk
from seqtopk.demo import CARD, MODEL_DIR, held_out_figures, held_out_ids
from seqtopk.paths import shared_path
from seqtopk.testing.tiny import build_tokenizer

from repro_tiny_finetune import build_model, train  # evals/ is on sys.path when this runs as a script

K, SEED = 2, 0
SETTINGS = {"cap": 4, "prefill": "causal"}  # how the demo (and the held-out figures) route
TRAINING_SETTINGS = {"cap": 4}  # the published sequence rule while fine-tuning


def mean_tail(losses: list[float], n: int = 20) -> float:
    return sum(losses[-n:]) / len(losses[-n:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 beside another job: two threads spinning against it took a "
                             "training step from 0.2 s to 5 s)")
    parser.add_argument("--record", type=Path, default=Path(__file__).parent / "results" / "demo_model.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = shared_path("data", "tinyshakespeare", "input.txt").read_text()
    tokenizer = build_tokenizer()
    ids = torch.tensor(tokenizer(text)["input_ids"])
    train_ids = ids[: int(len(ids) * 0.9)]
    start = time.time()
    model = build_model(K, SEED)
    pretrain = train(model, train_ids, args.pretrain_steps, 3e-3, 2 * SEED, "pretrain (TopK)")
    seqtopk.patch(model, **TRAINING_SETTINGS)
    finetune = train(model, train_ids, args.finetune_steps, 1e-3, 2 * SEED + 1, "fine-tune (SeqTopK)")
    seqtopk.unpatch(model)
    figures = held_out_figures(model, SETTINGS, held_out_ids(tokenizer, text))
    card = {"what": "OLMoE-style MoE (4 layers, hidden 128, 16 experts, top-2, byte-level, 128-token context) "
                    "trained on tinyshakespeare (first 90%) by evals/train_demo_model.py",
            "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps, "batch": 16, "seed": SEED,
            "pretrain_final_loss": mean_tail(pretrain), "finetune_final_loss": mean_tail(finetune),
            "seqtopk": SETTINGS, "finetuned_with": TRAINING_SETTINGS,
            "held_out": figures.as_dict(), "seconds": round(time.time() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
