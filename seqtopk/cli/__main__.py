"""`python -m seqtopk.cli`: the same as the `seqtopk` command."""

import sys

from seqtopk.cli import main

if __name__ == "__main__":  # vLLM (lm-eval --backend vllm) may start worker processes that import this module
    sys.exit(main())
