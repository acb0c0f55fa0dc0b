"""Sparse embedding heads and the sparse index they share. Heavy libraries are imported inside the
modules that need them, so importing this package stays cheap.

- index/: sparse vectors and an exact inverted index (engine-free; CSR sums per document, SSR takes MaxSim)
- data/: readers for the shared evaluation data, training sets and pair batches
- sae.py: the tied top-k sparse autoencoder CSR and SSR share (dead latents, AuxK, unit-norm sparse codes)
- backbone.py: the dense backbone (all-MiniLM-L6-v2 offline) and its on-disk embedding cache
- mteb/: MTEB tasks built from the shared data, and models wrapped for MTEB
- csr/: CSR / CSRv2 heads (dense embedding -> k-sparse code): coding, training, evaluation
- ssr/: SSR (per-token sparse codes, late interaction, exact MaxSim from the index)
- vllm/: heads served by vLLM as pooling models, with sparse output
- synthetic.py: synthetic corpora with real codes' statistics, for benchmarks at scale
"""
