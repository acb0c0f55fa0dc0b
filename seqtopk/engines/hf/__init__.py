"""transformers adapter: `seqtopk.patch(model)` lands here.

- patch.py: validate, install and remove the patch; route each MoE layer with the forward's view
- state.py: the forward's sequence view and the routing history tied to the KV cache
- experts.py: run only the chosen (token, expert) pairs through the family's experts module
Per-family details (where the router lives, its logits and scoring) are in `seqtopk.patches`.
"""

from seqtopk.engines.hf.patch import (
    SeqTopKPatch,
    UnsupportedModelError,
    find_patch,
    patch_model,
    require_patch,
    unpatch_model,
)

__all__ = ["SeqTopKPatch", "UnsupportedModelError", "find_patch", "patch_model", "require_patch", "unpatch_model"]
