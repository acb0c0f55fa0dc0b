"""CSR / CSRv2 sparse embedding heads: a tied top-k sparse autoencoder on a dense text embedder.

Training lives in `train`, the sentence-transformers module in `head`, MTEB glue in `mteb_tasks` /
`mteb_models`, vLLM serving in `vllm_model` (registration) and `vllm_csr_bert` (the model). Heavy
libraries are imported inside those modules, so importing this package stays cheap.
"""
