"""The SeqTopK paper's table at small scale: gain over TopK against sparsity, and against two parameter-free
adaptive rules at the same spend (issue 33).

1. A 64-expert, top-8 OLMoE-shaped model (transformers' OlmoeForCausalLM, byte-level tokens, tiny hidden sizes)
   pretrained on CPU with stock TopK-8 on the first 90% of tinyshakespeare and of the wikitext-2 test variant
   (CRLF made LF), per seed (init and batch order), with OLMoE's load-balancing loss, in stages (each a fresh
   AdamW with its warm-up, so no unit of work runs long).
2. At every budget k' in {8, 4, 2, 1} (sparsity k'/64), these routings:
   - topk: stock TopK-k' (`seqtopk.topk_at`; at 8 the model as it is);
   - seqtopk: SeqTopK-k', min_experts=0 (its default cap ceil(k')+2), evaluated under both prefill rules:
     "causal" (no information from later tokens, the honest one for a language-model loss) and "sequence"
     (the published rule; its cut sees the whole 128-token block);
   - top-p and entropy (evals/adaptive_routing.py), their parameter bisected on calibration text (first half of
     each held-out 10%) until the mean experts per token is k'.
   Each is evaluated switched on as it is, and after a fine-tune at that budget (same steps, lr and batches for
   every routing; SeqTopK trains under the sequence rule, the adaptive rules at their calibrated parameter and
   are calibrated again after it).
3. Held-out bits per byte (second half of each held-out 10%: one byte is one token), the relative gain over
   TopK-k' paired seed by seed, and the experts per token each routing really spent there; lm-eval's packaged
   tinyshakespeare_local task on the pretrained model, every routing switched on.

Long: work is cut in units (a pretraining stage, a seed's switched-on evaluations, one fine-tune, a seed's
lm-eval) saved under --work-dir as they finish, so a run stops after --max-minutes and the next one resumes;
every run rewrites the JSON and PNG from the units done so far (--assemble: only that), each row naming the
seeds it ran on; `seeds` lists the seeds that finished the whole grid.

    python evals/sparsity_table.py --seeds 0,1,2 --max-minutes 9   # repeat until it says the grid is done
    python evals/sparsity_table.py --seeds 0,1 --first-budgets 1,2 --max-minutes 15   # the sparse end first
    python evals/sparsity_table.py --small --work-dir /tmp/x --out /tmp/x/table.json   # under a minute (tests)
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import figure, save_results  # noqa: E402
from adaptive_routing import adaptive_routing, calibrate  # noqa: E402
from budget_sweep import mean_std  # noqa: E402
from repro_tiny_finetune import SEQ_LEN, held_out_loss, train  # noqa: E402

BUDGETS = (8, 4, 2, 1)
ROUTINGS = ("topk", "seqtopk", "top-p", "entropy")
FIXED_ROWS, ADAPTIVE_RULES = ("topk", "seqtopk-causal", "seqtopk-sequence"), ("top-p", "entropy")
ROWS = FIXED_ROWS + ADAPTIVE_RULES  # what is evaluated per budget
STAGES = ("switched_on", "fine_tuned")
LM_EVAL_TASK, LM_EVAL_ROWS = "tinyshakespeare_local", ("topk", "seqtopk-causal", "top-p", "entropy")
RESULT = Path(__file__).parent / "results" / "sparsity_table.json"
WORK_DIR = Path(__file__).resolve().parents[1] / ".cache" / "sparsity_table"
TEXTS = (("tinyshakespeare", "input.txt"), ("wikitext2_test_variant", "wiki.test.raw"))
SHAPES = {  # hidden sizes divisible by 32; 64 experts, top-8 as OLMoE
    "full": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
}
RECIPES = {
    "full": dict(pretrain_stages=3, pretrain_stage_steps=500, finetune_steps=100, eval_tokens=65536,
                 calibration_tokens=16384),
    "small": dict(pretrain_stages=2, pretrain_stage_steps=15, finetune_steps=3, eval_tokens=2048,
                  calibration_tokens=1024),
}
CALIBRATION_ITERATIONS = {"full": 24, "small": 12}  # bisection steps (stops early within 0.2% of the target)
LM_EVAL_LIMIT = {"full": None, "small": 4}  # documents of the lm-eval task (None: all)
PRETRAIN_LR, FINETUNE_LR, BATCH = 3e-3, 1e-3, 16  # repro_tiny_finetune.train: batch 16, 20 warm-up steps, AdamW


def build_model(shape: dict, seed: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(vocab_size=320, num_experts=64, num_experts_per_tok=8,
                         num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=SEQ_LEN,
                         norm_topk_prob=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         router_aux_loss_coef=0.01, output_router_logits=False, **shape)
    config._experts_implementation = "grouped_mm"  # the eager loop over 64 experts is twice as slow on CPU
    torch.manual_seed(seed)
    return OlmoeForCausalLM(config)


def load_texts(recipe: dict) -> dict:
    """Token ids: train (first 90% of each text, joined), calibration and test blocks (halves of each last 10%,
    the same number of tokens from each text)."""
    from seqtopk.paths import shared_path
    from seqtopk.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    train_parts, calibration, test, sizes = [], [], [], {}
    for folder, name in TEXTS:
        text = shared_path("data", folder, name).read_text().replace("\r\n", "\n")
        ids = torch.tensor(tokenizer(text)["input_ids"])
        split = int(len(ids) * 0.9)
        held = ids[split:]
        half = len(held) // 2
        train_parts.append(ids[:split])
        calibration.append(_blocks(held[:half], recipe["calibration_tokens"] // len(TEXTS)))
        test.append(_blocks(held[half:], recipe["eval_tokens"] // len(TEXTS)))
        sizes[folder] = {"bytes": len(text.encode()), "train_tokens": split, "held_out_tokens": len(held)}
    return {"train": torch.cat(train_parts), "calibration": torch.cat(calibration), "test": torch.cat(test),
            "sizes": sizes}


def _blocks(ids: torch.Tensor, tokens: int) -> torch.Tensor:
    n = min(tokens, len(ids)) // SEQ_LEN
    if n == 0:
        raise ValueError(f"held-out text too short for one {SEQ_LEN}-token block")
    return ids[: n * SEQ_LEN].view(n, SEQ_LEN)


def bits_per_byte(model, blocks) -> float:
    """Held-out loss in bits per byte (byte-level tokens: nats per token / ln 2)."""
    return held_out_loss(model, blocks.reshape(-1)) / math.log(2)


# ------------------------------------------------------------------------------------------ routings


@contextmanager
def routed(model, row: str, k: int, parameter: float | None = None):
    """Route `model` as `row` at budget k inside the block; yields a function giving the experts per token spent
    so far (all layers)."""
    import seqtopk

    if row == "topk" and k == model.config.num_experts_per_tok:
        yield lambda: float(k)
    elif row in ("topk", "seqtopk-causal", "seqtopk-sequence"):
        context = (seqtopk.topk_at(model, k) if row == "topk"
                   else seqtopk.patched(model, k=k, min_experts=0, prefill=row.split("-")[1]))
        with context:
            yield lambda: seqtopk.routing_stats(model).mean_experts_per_token
    else:
        with adaptive_routing(model, row, parameter) as spend:
            yield lambda: spend.experts_per_token


def evaluate(model, row: str, k: int, test, parameter: float | None = None) -> dict:
    """One row at budget k: bits per byte on the test blocks and the experts per token it spent there."""
    with routed(model, row, k, parameter) as spent:
        out = {"bits_per_byte": bits_per_byte(model, test), "experts_per_token": spent()}
    if parameter is not None:
        out["parameter"] = parameter
    return out


def calibrated(model, rule: str, k: int, data: dict) -> dict:
    """The rule's parameter bisected on the calibration blocks until it spends k experts per token."""
    return calibrate(model, rule, k, data["calibration"], data["calibration_iterations"])


def switched_on(model, data, rows) -> dict:
    """These rows at every budget on the pretrained model, adaptive rules calibrated first."""
    out = {}
    for k in BUDGETS:
        out[str(k)] = {}
        for row in rows:
            calibration = calibrated(model, row, k, data) if row in ADAPTIVE_RULES else None
            result = evaluate(model, row, k, data["test"], calibration and calibration["parameter"])
            if calibration:
                result["calibration"] = calibration
            out[str(k)][row] = result
    return out


def fine_tune(state, shape, routing, k, data, steps, seed) -> dict:
    """Fine-tune a copy of the pretrained model at budget k with `routing` on, then evaluate its rows."""
    import contextlib

    import seqtopk

    model = build_model(shape, seed)
    model.load_state_dict(state)
    out, before = {}, None
    if routing == "topk":
        context = contextlib.nullcontext() if k == 8 else seqtopk.topk_at(model, k)
    elif routing == "seqtopk":
        context = seqtopk.patched(model, k=k, min_experts=0)  # the published sequence rule while training
    else:
        before = calibrated(model, routing, k, data)
        context = adaptive_routing(model, routing, before["parameter"])
    with context:
        losses = train(model, data["train"], steps, FINETUNE_LR, 2 * seed + 1, f"fine-tune {routing}-{k} seed {seed}")
    rows = ("seqtopk-causal", "seqtopk-sequence") if routing == "seqtopk" else (routing,)
    for row in rows:
        calibration = None
        if before is not None:  # fine-tuning moved the router: calibrate again on the calibration text
            calibration = calibrated(model, routing, k, data)
        out[row] = evaluate(model, row, k, data["test"], calibration and calibration["parameter"])
        if calibration:
            out[row].update(calibration=calibration, calibration_before_fine_tune=before)
    return {"rows": out, "train_loss_curve": curve(losses)}


def lm_eval_switched_on(model, switched: dict, limit: int | None) -> dict:
    """lm-eval's tinyshakespeare_local (the packaged local task: rolling log-likelihood over the held-out
    speeches) on the pretrained model, every row at every budget switched on (adaptive rules at the parameter
    calibrated for the switched-on table; SeqTopK under the causal rule, which lm-eval's right-padded batches
    allow)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from seqtopk.lm_eval.runner import TASKS_DIR
    from seqtopk.testing.tiny import build_tokenizer

    manager = TaskManager(include_path=str(TASKS_DIR))
    lm = HFLM(pretrained=model, tokenizer=build_tokenizer(), batch_size=16, device="cpu")
    out = {}
    for k in BUDGETS:
        out[str(k)] = {}
        for row in LM_EVAL_ROWS:
            parameter = switched[str(k)][row]["parameter"] if row in ADAPTIVE_RULES else None
            with routed(model, row, k, parameter) as spent:
                metrics = simple_evaluate(model=lm, tasks=[LM_EVAL_TASK], limit=limit, task_manager=manager,
                                          bootstrap_iters=0)["results"][LM_EVAL_TASK]
                out[str(k)][row] = {"bits_per_byte": metrics["bits_per_byte,none"], "experts_per_token": spent()}
    return out


def curve(losses: list[float], every: int = 10) -> list[float]:
    """Training loss (nats per token) averaged over each `every` steps."""
    return [round(statistics.mean(losses[i:i + every]), 4) for i in range(0, len(losses), every)]


# ------------------------------------------------------------------------------------------ units and resume


def units(seeds, stages: int) -> list[tuple]:
    out = []
    for seed in seeds:
        out += [("pretrain", seed, stage) for stage in range(stages)] + [("switched_on", seed)]
        out += [("switched_on_adaptive", seed)]
        out += [("fine_tune", seed, k, routing) for k in BUDGETS for routing in ROUTINGS] + [("lm_eval", seed)]
    return out


def unit_file(work_dir: Path, unit: tuple) -> Path:
    return work_dir / ("-".join(str(u) for u in unit) + ".json")


def run_unit(unit, work_dir, shape, recipe, data) -> dict:
    kind, seed = unit[0], unit[1]
    checkpoint = work_dir / f"pretrained-{seed}.pt"
    if kind == "pretrain":  # in stages, so a chunk of work stays short: each a fresh AdamW with its warm-up
        stage = unit[2]
        model = build_model(shape, seed)
        if stage:
            model.load_state_dict(torch.load(checkpoint))
        model.config.output_router_logits = True  # OLMoE's load balancing while 64 experts learn
        losses = train(model, data["train"], recipe["pretrain_stage_steps"], PRETRAIN_LR, 2 * seed + 1000 * stage,
                       f"pretrain seed {seed} stage {stage}")
        torch.save(model.state_dict(), checkpoint)
        return {"train_loss_curve": curve(losses, 20), "final_train_loss": statistics.mean(losses[-20:])}
    state = torch.load(checkpoint)
    if kind in ("switched_on", "switched_on_adaptive", "lm_eval"):
        model = build_model(shape, seed)
        model.load_state_dict(state)
        model.eval()
        if kind == "switched_on":
            return switched_on(model, data, FIXED_ROWS)
        if kind == "switched_on_adaptive":
            return switched_on(model, data, ADAPTIVE_RULES)
        calibrations = json.loads(unit_file(work_dir, ("switched_on_adaptive", seed)).read_text())
        return lm_eval_switched_on(model, calibrations, data["lm_eval_limit"])
    _, _, k, routing = unit
    return fine_tune(state, shape, routing, k, data, recipe["finetune_steps"], seed)


# ------------------------------------------------------------------------------------------ summary


def summarise(done: dict, seeds: list[int]) -> dict:
    """Per stage, budget and row: bits per byte and spend per seed, and the gain over TopK-k' paired by seed
    (relative: (TopK - row) / TopK, so positive is better than TopK), over the seeds where both ran."""
    table = {}
    for stage in STAGES:
        table[stage] = {}
        for k in BUDGETS:
            per_row = {row: {} for row in ROWS}
            for seed in seeds:
                if stage == "switched_on":
                    found = {**done.get(("switched_on", seed), {}).get(str(k), {}),
                             **done.get(("switched_on_adaptive", seed), {}).get(str(k), {})}
                else:
                    found = {}
                    for routing in ROUTINGS:
                        found.update(done.get(("fine_tune", seed, k, routing), {}).get("rows", {}))
                for row, result in found.items():
                    per_row[row][seed] = result
            table[stage][str(k)] = {row: summarise_row(results, per_row["topk"])
                                    for row, results in per_row.items() if results}
    return table


def summarise_row(results: dict, topk: dict) -> dict:
    seeds = sorted(results)
    bpb = [results[s]["bits_per_byte"] for s in seeds]
    spend = [results[s]["experts_per_token"] for s in seeds]
    mean, std = mean_std(bpb)
    row = {"seeds": seeds, "bits_per_byte": mean, "bits_per_byte_std": std, "bits_per_byte_per_seed": bpb,
           "experts_per_token": statistics.mean(spend), "experts_per_token_per_seed": spend}
    paired = [s for s in seeds if s in topk]
    if paired:
        gains = [100 * (topk[s]["bits_per_byte"] - results[s]["bits_per_byte"]) / topk[s]["bits_per_byte"]
                 for s in paired]
        diffs = [results[s]["bits_per_byte"] - topk[s]["bits_per_byte"] for s in paired]
        g_mean, g_std = mean_std(gains)
        d_mean, d_std = mean_std(diffs)
        row.update(paired_seeds=paired, gain_over_topk_pct=g_mean, gain_over_topk_pct_std=g_std,
                   gain_over_topk_pct_per_seed=gains, minus_topk_bits_per_byte=d_mean,
                   minus_topk_bits_per_byte_std=d_std, minus_topk_bits_per_byte_per_seed=diffs)
    calibrations = [results[s]["calibration"] for s in seeds if "calibration" in results[s]]
    if calibrations:
        row["calibrations_per_seed"] = calibrations
        row["parameter_per_seed"] = [c["parameter"] for c in calibrations]
        row["calibrated_spend_per_seed"] = [c["calibrated_spend"] for c in calibrations]
    return row


def verdict(table: dict) -> dict:
    """Does SeqTopK's gain over TopK grow as the budget shrinks, and does it beat the adaptive rules at the same
    spend? (fine-tuned rows, SeqTopK under the causal rule; complete only where every budget ran)."""
    rows = table["fine_tuned"]
    gains = {k: rows.get(str(k), {}).get("seqtopk-causal", {}).get("gain_over_topk_pct") for k in BUDGETS}
    out = {"seqtopk_causal_gain_pct_by_budget": {str(k): g for k, g in gains.items()}}
    if any(g is None for g in gains.values()):
        out["complete"] = False
        return out
    ordered = [gains[k] for k in BUDGETS]  # 8, 4, 2, 1: sparser to the right
    out["complete"] = True
    out["gain_grows_with_sparsity"] = all(b >= a for a, b in zip(ordered, ordered[1:]))
    out["gain_at_1_minus_gain_at_8_pct"] = gains[1] - gains[8]
    beats = {}
    for rule in ("top-p", "entropy"):
        beats[rule] = {str(k): rows[str(k)]["seqtopk-causal"]["bits_per_byte"] < rows[str(k)][rule]["bits_per_byte"]
                       for k in BUDGETS if rule in rows[str(k)]}
    out["seqtopk_causal_beats"] = beats
    out["seqtopk_causal_beats_both_at_every_budget"] = all(all(v.values()) for v in beats.values())
    return out


def plot(result: dict, path: Path) -> None:
    colors = {"topk": "tab:gray", "seqtopk-causal": "tab:orange", "seqtopk-sequence": "tab:red",
              "top-p": "tab:blue", "entropy": "tab:green"}
    with figure(path, 1, 3, figsize=(18, 5)) as (fig, axes):
        for ax, stage in zip(axes[:2], STAGES):
            for row in ROWS:
                points = [(k / 64, r["gain_over_topk_pct"], r["gain_over_topk_pct_std"])
                          for k in BUDGETS if (r := result["table"][stage].get(str(k), {}).get(row))
                          and "gain_over_topk_pct" in r]
                if points:
                    x, y, e = zip(*points)
                    ax.errorbar(x, y, yerr=e, fmt="o-", color=colors[row], capsize=3, label=row)
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks([k / 64 for k in BUDGETS], [f"{k}/64" for k in BUDGETS])
            ax.invert_xaxis()
            ax.set_xlabel("sparsity: experts per token / 64 (sparser to the right)")
            ax.set_ylabel("gain over TopK-k' (% of its bits/byte; mean, std over seeds)")
            ax.set_title(f"{stage.replace('_', ' ')}", fontsize=10)
            ax.legend(fontsize=8)
        ax = axes[2]
        for row in ROWS:
            points = [(k, r["experts_per_token"], r["bits_per_byte"]) for k in BUDGETS
                      if (r := result["table"]["fine_tuned"].get(str(k), {}).get(row))]
            if points:
                _, spend, bpb = zip(*points)
                ax.plot(spend, bpb, "o-", color=colors[row], label=row)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts per token really spent (held-out)")
        ax.set_ylabel("held-out bits per byte, fine-tuned")
        ax.set_title("fine-tuned: loss against spend", fontsize=10)
        ax.legend(fontsize=8)
        fig.suptitle(f"64 experts, top-8 OLMoE-shaped model: gain over TopK against sparsity (each point: the seeds "
                     f"that ran it, of {result['seeds_with_results']}; whole grid: {result['seeds'] or 'none yet'})")


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (model init and batch order)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no unit expected to end after this many minutes (resume with the same command)")
    parser.add_argument("--assemble", action="store_true",
                        help="run no unit: write the JSON and PNG from the units already done")
    parser.add_argument("--small", action="store_true", help="a tiny model and few steps: under a minute (tests)")
    parser.add_argument("--first-budgets", default="",
                        help="comma-separated budgets whose fine-tunes run before the others' (e.g. 1,2: the sparse "
                             "end first); the grid and the JSON are the same")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="finished units and pretrained weights")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the lead's benchmarks need quiet)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, e.g. 0,1,2 (got {args.seeds!r})")
    torch.set_num_threads(args.threads)
    size = "small" if args.small else "full"
    shape, recipe = SHAPES[size], RECIPES[size]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    setup_file = args.work_dir / "setup.json"
    setup = {"size": size, "shape": shape, "recipe": recipe}
    if setup_file.is_file() and json.loads(setup_file.read_text()) != setup:
        parser.error(f"{args.work_dir} holds units of another configuration; give another --work-dir")
    setup_file.write_text(json.dumps(setup))
    data = {**load_texts(recipe), "calibration_iterations": CALIBRATION_ITERATIONS[size],
            "lm_eval_limit": LM_EVAL_LIMIT[size]}
    start, seconds = time.time(), {}
    for path in args.work_dir.glob("*-*.json"):  # how long each kind of unit took before: the stop rule's guess
        kind = path.stem.split("-")[0]
        seconds[kind] = max(seconds.get(kind, 0.0), json.loads(path.read_text()).get("seconds", 0.0))
    asked = units(seeds, recipe["pretrain_stages"])
    todo = [] if args.assemble else [u for u in asked if not unit_file(args.work_dir, u).is_file()]
    try:
        first = [int(k) for k in args.first_budgets.split(",") if k]
    except ValueError:
        parser.error(f"--first-budgets takes comma-separated budgets of {BUDGETS} (got {args.first_budgets!r})")
    if not set(first) <= set(BUDGETS):
        parser.error(f"--first-budgets takes budgets of {BUDGETS} (got {args.first_budgets!r})")
    # (stable: seed order kept; a fine-tune needs only its seed's pretraining, which sorts before any fine-tune)
    todo.sort(key=lambda u: 0 if u[0] != "fine_tune" else (1 + first.index(u[2]) if u[2] in first else 1 + len(first)))
    for unit in tqdm(todo, desc="units"):
        expected = seconds.get(unit[0], 0.0)
        if args.max_minutes is not None and time.time() - start + expected > 60 * args.max_minutes:
            print(f"stopping before {unit}: --max-minutes {args.max_minutes} reached; run again to resume", flush=True)
            break
        began = time.time()
        result = run_unit(unit, args.work_dir, shape, recipe, data)
        result["seconds"] = round(time.time() - began, 1)
        seconds[unit[0]] = max(seconds.get(unit[0], 0.0), result["seconds"])
        unit_file(args.work_dir, unit).write_text(json.dumps(result))
        print(f"{unit}: {result['seconds']} s", flush=True)
    done = {u: json.loads(unit_file(args.work_dir, u).read_text()) for u in asked
            if unit_file(args.work_dir, u).is_file()}
    complete = [s for s in seeds if all(u in done for u in units([s], recipe["pretrain_stages"]))]
    config = {"num_experts": 64, "top_k": 8, "model": "OlmoeForCausalLM", **shape, "vocab_size": 320,
              "seq_len": SEQ_LEN, "experts_implementation": "grouped_mm"}
    result = {
        "seeds": complete,
        "seed_count": len(complete),
        "seeds_with_results": sorted({u[1] for u in done}),
        "seeds_asked": seeds,
        "seeds_partial": [s for s in seeds if s not in complete and any(u[1] == s for u in done)],
        "configuration": config,
        "recipe": {**recipe, "batch": BATCH, "pretrain_lr": PRETRAIN_LR, "finetune_lr": FINETUNE_LR,
                   "warm_up_steps": 20,
                   "calibration_iterations": CALIBRATION_ITERATIONS[size],
                   "lm_eval": {"task": LM_EVAL_TASK, "limit": LM_EVAL_LIMIT[size], "batch_size": 16,
                               "model": "pretrained, switched on"}, "optimizer": "AdamW, weight decay 0, grad clip 1.0",
                   "pretrain_routing": "TopK-8 with OLMoE load-balancing loss (coef 0.01)",
                   "finetune_routing": "the routing evaluated, at its budget (SeqTopK: sequence rule); no "
                                       "balancing loss", "seed_use": "init s, pretrain stage j batches 2s+1000j, fine-tune 2s+1",
                   "pretrain_steps": recipe["pretrain_stages"] * recipe["pretrain_stage_steps"],
                   "seqtopk": "k', min_experts=0, cap ceil(k')+2 (default)",
                   "data": {"texts": [f"{f}/{n}" for f, n in TEXTS], **load_sizes(data)}},
        "budgets": list(BUDGETS), "routings": list(ROUTINGS), "rows": list(ROWS),
        "pretraining": {str(s): pretraining(done, s, recipe["pretrain_stages"]) for s in seeds
                        if ("pretrain", s, 0) in done},
        "fine_tune_curves": {f"{u[1]}:{u[3]}-{u[2]}": r["train_loss_curve"] for u, r in done.items()
                             if u[0] == "fine_tune"},
        "units_done": len(done), "units_asked": len(asked),
        "unit_seconds": sum(r["seconds"] for r in done.values()),
        "table": summarise(done, seeds),  # each row names the seeds it ran on
    }
    ran = [s for s in seeds if ("lm_eval", s) in done]
    result["lm_eval"] = {k: {row: summarise_row(*({s: done[("lm_eval", s)][k][r] for s in ran} for r in (row, "topk")))
                             for row in LM_EVAL_ROWS} for k in map(str, BUDGETS)} if ran else {}
    result["verdict"] = verdict(result["table"])
    save_results(result, args.out, plot)
    print(json.dumps(result["verdict"], indent=2))
    print(f"{len(done)}/{len(asked)} units done; complete seeds {complete}; wrote {args.out} and "
          f"{args.out.with_suffix('.png')}")
    return 0


def pretraining(done: dict, seed: int, stages: int) -> dict:
    """One seed's pretraining stages joined: the loss curve (every 20 steps) and the last stage's final loss."""
    ran = [done[("pretrain", seed, stage)] for stage in range(stages) if ("pretrain", seed, stage) in done]
    return {"stages_done": len(ran), "train_loss_curve": [x for r in ran for x in r["train_loss_curve"]],
            "stage_final_train_loss": [r["final_train_loss"] for r in ran],
            "seconds": sum(r["seconds"] for r in ran)}


def load_sizes(data: dict) -> dict:
    return {"per_text": data["sizes"], "train_tokens": int(data["train"].numel()),
            "calibration_tokens": int(data["calibration"].numel()), "test_tokens": int(data["test"].numel())}


if __name__ == "__main__":
    raise SystemExit(main())
