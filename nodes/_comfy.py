"""ComfyUI glue shared by the nodes: live messages to the browser.

Only imported while ComfyUI runs a node (it imports ComfyUI modules lazily).
"""
from __future__ import annotations

import logging
import sys

PROGRESS_EVENT = "lora2.progress"


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
