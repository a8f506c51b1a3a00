"""ComfyUI glue shared by the nodes: apply an adapter through ModelPatcher patches, talk to the browser.

Only imported while ComfyUI runs a node (it imports ComfyUI modules lazily).
"""
from __future__ import annotations

import logging
import sys

PROGRESS_EVENT = "lora2.progress"


def apply_adapter(model, clip, adapter, strength_model: float = 1.0, strength_clip: float = 1.0):
    """(MODEL, CLIP) clones patched with `adapter` (a ``lora2_train.format.Adapter``).

    ComfyUI's own LoRA path does the work: the kohya keys are mapped to model
    weights by ``comfy.lora``, and ``ModelPatcher.add_patches`` records them on a
    clone, so the cached base model is never changed.  Ragged ranks need nothing
    special: each module's patch carries its own rank.
    """
    import comfy.sd

    from lora2_train.format import adapter_state_dict

    sd = adapter_state_dict(adapter, "fp32")
    return comfy.sd.load_lora_for_models(model, clip, sd, strength_model, strength_clip)


def send(event: str, data: dict) -> None:
    """Send a message to every connected browser (no-op without a running server)."""
    server = sys.modules.get("server")  # imported by ComfyUI's main; never imported from here
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    try:
        instance.send_sync(event, data)
    except Exception as e:  # a closed socket must not stop training
        logging.debug("lora2: could not send %s: %s", event, e)
