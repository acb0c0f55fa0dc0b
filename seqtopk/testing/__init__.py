"""What tests, benchmarks and the demo share: tiny offline MoE checkpoints (tiny.py) and a local vLLM
server in a child process (server.py). Nothing here is needed to use seqtopk on a real model."""
