"""ComfyUI node classes (classic node API).  Thin adapters: every computation lives in ``lora2_train``."""
from .train import TrainLoRA2
from .visualize import VisualizeLoRA2Ranks

NODE_CLASS_MAPPINGS = {
    "LoRA2VisualizeRanks": VisualizeLoRA2Ranks,
    "LoRA2Train": TrainLoRA2,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRA2VisualizeRanks": "Visualize LoRA² Ranks",
    "LoRA2Train": "Train LoRA² (SDXL)",
}
