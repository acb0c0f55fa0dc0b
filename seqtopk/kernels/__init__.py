"""Fused routing kernels: compiled C++ ops for the CPU (cpu/, loaded by compiled.py) and Triton kernels for CUDA
GPUs (sequence_cut.py, decode_step.py). Each has a pure-torch reference in seqtopk.routing; backend.py is the one
place that decides which runs."""
