"""Optional fused GPU kernels (Triton). Each has a pure-torch equivalent in seqtopk.routing.rules, its reference."""
