"""SSR: per-token sparse codes indexed with plain inverted lists, scored by exact late interaction (MaxSim).

- tokens.py: which tokens of a query or document get a vector, and the backbone's token outputs (cached)
- the token code is the tied top-k SAE CSR trains too (seqtopk.sparse.coding.sae.TopKSAE), unit-norm codes;
  folder.py: the saved encoder folder
- train.py: reconstruction + AuxK + contrastive loss on sparse MaxSim, on SciFact train pairs
- encoder.py: text -> token codes; index.py: build, save, load (one head only) and search an SSR index
- evaluate.py: SciFact test with MTEB's retrieval evaluator (a user's corpus.jsonl is read by
  seqtopk.sparse.data.readers.read_beir_jsonl, checked whole)
- baselines.py: exact dense MaxSim and a faiss k-means centroid index; authors_path.py: the authors'
  single-product index path, which is not MaxSim (kept to show it)
The index itself is the shared one: seqtopk.sparse.index.multivector. Serving: seqtopk.sparse.vllm.ssr_bert.
"""
