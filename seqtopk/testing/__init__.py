"""What tests, benchmarks and the demo share: tiny offline MoE checkpoints (tiny.py), a local vLLM
server in a child process (server.py), and whether a test lacking vLLM, ../shared or a GPU skips or fails
(require.py: under CI=true a missing vLLM or ../shared fails). Nothing here is needed to use seqtopk on a
real model."""
