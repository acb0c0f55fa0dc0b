"""The PLAID anchor's own virtual environment: evals/anchors/.venv-plaid with plaid-requirements.txt.

fast-plaid pins torch==2.11.0, which clashes with the project environment, so PLAID runs in a venv of its
own, made on demand by the evaluation that needs it (never by tests or CI). Stdlib only: it runs in the
project's Python.

    python evals/anchors/plaid_venv.py          # create it (minutes; about 4.8 GB), print its python
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-plaid"
REQUIREMENTS = HERE / "plaid-requirements.txt"
STAMP = VENV / "installed-requirements.txt"  # a copy of the requirements it was installed from


def plaid_python() -> Path:
    """The venv's python, creating or refreshing the venv when the pinned requirements changed."""
    python = VENV / "bin" / "python"
    wanted = REQUIREMENTS.read_text()
    if python.is_file() and STAMP.is_file() and STAMP.read_text() == wanted:
        return python
    print(f"creating the PLAID venv at {VENV} from {REQUIREMENTS.name} (minutes) ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    try:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
        subprocess.run([str(python), "-c", "import fast_plaid.search"], check=True)
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"installing {REQUIREMENTS} into {VENV} failed ({err}); see pip's message above. The pins "
                         "need PyPI (fast-plaid 1.7.0.2110 and torch 2.11.0)") from None
    STAMP.write_text(wanted)
    return python


if __name__ == "__main__":
    print(plaid_python())
    sys.exit(0)
