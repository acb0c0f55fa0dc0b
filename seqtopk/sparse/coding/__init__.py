"""What CSR and SSR share, below both of them and below the vLLM layer that serves them.

- sae.py: the tied top-k sparse autoencoder both train and encode with (dead latents, AuxK, unit-norm codes)
- sparse_coding.py: its code as plain tensor functions (torch only; the vLLM head layer runs the same ones)
- losses.py: the training losses (normalised reconstruction, AuxK, InfoNCE, SupCon, CSR's batch loss)
- folder_format.py: what a saved head folder names (vLLM architecture and sparse-output plugin, where the tied
  weight is kept) and the error for a bad one

Nothing here imports csr/, ssr/ or vllm/ (tests/test_layout.py); heavy libraries are imported by the modules
that need them, so importing this package stays cheap.
"""
