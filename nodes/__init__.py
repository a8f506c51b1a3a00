"""ComfyUI node classes (classic node API).  Thin adapters: every computation lives in ``lora2_train``."""
from .visualize import VisualizeLoRA2Ranks

NODE_CLASS_MAPPINGS = {
    "LoRA2VisualizeRanks": VisualizeLoRA2Ranks,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRA2VisualizeRanks": "Visualize LoRA² Ranks",
}
