"""Sparse embedding heads served by vLLM: architecture registration (registry.py, called by the seqtopk
vLLM plugin), the served model (csr_bert.py), and the sparse /pooling output plugin (sparse_output.py)."""
