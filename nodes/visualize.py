"""Visualize LoRA² Ranks: per-block rank chart of one adapter, or two side by side, as an IMAGE."""
from . import _pack

NONE = "(none)"


class VisualizeLoRA2Ranks:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("chart",)
    FUNCTION = "visualize"
    DESCRIPTION = "Chart the per-module ranks of a LoRA (ragged or not), optionally against a second one."

    @classmethod
    def INPUT_TYPES(cls):
        names = _pack.lora_names()
        return {
            "required": {"lora_name": (names,)},
            "optional": {"compare_with": ([NONE] + names, {"default": NONE})},
        }

    def visualize(self, lora_name, compare_with=NONE):
        import torch

        from lora2_train.format import load_adapter
        from lora2_train.plot import rank_chart

        names = [lora_name] + ([compare_with] if compare_with not in (None, "", NONE) else [])
        ranks = [load_adapter(_pack.lora_path(n)).ranks() for n in names]
        image = rank_chart(ranks, names, title="LoRA² ranks")
        return (torch.from_numpy(image).float().div(255.0)[None],)
