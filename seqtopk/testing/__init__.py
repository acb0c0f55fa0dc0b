"""What tests, benchmarks and the demo share: tiny offline MoE checkpoints (tiny.py), a local vLLM
server in a child process (server.py), whether a test lacking vLLM, ../shared or a GPU skips or fails
(require.py: under CI=true a missing vLLM or ../shared fails), and the static check of a vLLM source tree
against the names the vLLM plugin uses (vllm_tree.py). Nothing here is needed to use seqtopk on a real model."""
