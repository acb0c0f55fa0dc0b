"""What CSR and SSR share, below both of them and below the vLLM layer that serves them: the format of a saved
head folder (folder_format.py: the names its config.json gives vLLM, where the tied weight is kept, the error
for a bad folder). Nothing here imports csr/, ssr/ or vllm/.
"""
