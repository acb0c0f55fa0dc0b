"""CSR / CSRv2 sparse embedding heads: a tied top-k sparse autoencoder on a dense text embedder.

The module, its code and the losses are shared with SSR (seqtopk.sparse.coding). Here: training in `train`
(`finetune`: the backbone trained end to end, `checkpoint`: stop and go on, `dense_head`: the MRL reference),
MTEB evaluation of heads in `evaluate`, the fields a folder needs to be served by vLLM in `serving_config` (the
served model lives in seqtopk.sparse.vllm), and the checks a saved folder passes before anything loads it in
`folder`. Heavy libraries are imported inside those modules, so importing this package stays cheap.
"""
