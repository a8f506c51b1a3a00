"""ComfyUI node classes (classic node API).  Thin adapters: every computation lives in ``lora2_train``."""
from .train import TrainLoRA2
from .load import LoadLoRA2Adapter
from .tools import MergeLoRA2Adapters, ZeroPadLoRA2Adapter
from .visualize import VisualizeLoRA2Ranks
from .evaluate import DreamBoothPrompt, ScoreImages

NODE_CLASS_MAPPINGS = {
    "LoRA2VisualizeRanks": VisualizeLoRA2Ranks,
    "LoRA2LoadAdapter": LoadLoRA2Adapter,
    "LoRA2ZeroPad": ZeroPadLoRA2Adapter,
    "LoRA2Merge": MergeLoRA2Adapters,
    "LoRA2Train": TrainLoRA2,
    "LoRA2ScoreImages": ScoreImages,
    "LoRA2DreamBoothPrompt": DreamBoothPrompt,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRA2VisualizeRanks": "Visualize LoRA² Ranks",
    "LoRA2LoadAdapter": "Load LoRA² Adapter",
    "LoRA2ZeroPad": "Zero-Pad LoRA² Adapter",
    "LoRA2Merge": "Merge LoRA² Adapters",
    "LoRA2Train": "Train LoRA² (SDXL)",
    "LoRA2ScoreImages": "LoRA² Score Images (DINO / CLIP)",
    "LoRA2DreamBoothPrompt": "LoRA² DreamBooth Prompt",
}
