"""Sparse embedding heads and the sparse index they share. Heavy libraries are imported inside the
modules that need them, so importing this package stays cheap. Rooms, lowest first:

- index/: sparse vectors and an exact inverted index (engine-free; CSR sums per document, SSR takes MaxSim)
- data/: readers for the shared evaluation data, training sets and pair batches
- backbone.py: the dense backbone (all-MiniLM-L6-v2 offline) and its on-disk embedding cache
- coding/: what CSR and SSR share: the tied top-k sparse autoencoder (dead latents, AuxK, unit-norm sparse
  codes), its code as tensor functions, the losses, and the saved head folder's format (vLLM names included)
- mteb/: MTEB tasks built from the shared data, and models wrapped for MTEB
- synthetic.py: synthetic corpora with real codes' statistics, for benchmarks at scale
- csr/: CSR / CSRv2 heads (dense embedding -> k-sparse code): training, evaluation, saved folders
- ssr/: SSR (per-token sparse codes, late interaction, exact MaxSim from the index)
- export/: CSR and SSR codes in vector engines (Milvus, Qdrant)
- vllm/: heads served by vLLM as pooling models, with sparse output

A room imports only rooms ranked below it (tests/test_layout.py, SPARSE_ROOMS): index/ and data/; backbone.py
and coding/; mteb/ and synthetic.py; csr/ and ssr/; export/ and vllm/. Rooms of one rank never import each
other, so nothing shared imports a room that uses it.
"""
