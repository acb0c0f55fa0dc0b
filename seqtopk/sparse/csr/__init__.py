"""CSR / CSRv2 sparse embedding heads: a tied top-k sparse autoencoder on a dense text embedder.

The code itself in `sparse_coding`, the module (shared with SSR) in seqtopk.sparse.sae, losses in `losses`,
training in `train`, MTEB evaluation of heads in `evaluate`, and the fields a folder needs to be served by
vLLM in `serving_config` (the served model lives in seqtopk.sparse.vllm), the checks a saved folder passes
before anything loads it in `folder`. Heavy libraries are imported inside those modules, so importing this
package stays cheap.
"""
