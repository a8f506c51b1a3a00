"""LoRA² for ComfyUI: train, load, inspect, visualize, pad and merge adaptive-rank LoRAs.

ComfyUI imports this folder as a custom node package.  Importing it anywhere
else works too (the nodes only touch ComfyUI modules when they run).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
