"""Visualize LoRA² Ranks: per-block rank chart as an IMAGE (``lora2_train.plot.rank_chart``).

Sources, all optional, charted side by side: a file of the ``loras`` list (``lora_name``), a second file
(``compare_with``), an adapter object (``LORA2``, e.g. from the training node), an info dict (``LORA2_INFO``, e.g.
from Load LoRA² Adapter: its ``ranks`` and, under a budget, its ``full_ranks``) and a rank history
(``LORA2_HISTORY``: a list of ``{"step", "ranks", "loss"}`` dicts), drawn as a curve of ranks over steps.
"""
from . import _pack

NONE = "(none)"


def _given(name) -> bool:
    return name not in (None, "", NONE)


class VisualizeLoRA2Ranks:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("chart",)
    FUNCTION = "visualize"
    DESCRIPTION = ("Chart the per-module ranks of LoRAs (ragged or not): a file, a second file to compare with, "
                   "an adapter or info from other LoRA² nodes, and the rank history of a training run.")

    @classmethod
    def INPUT_TYPES(cls):
        names = _pack.lora_names()
        return {
            "required": {"lora_name": ([NONE] + names, {"default": names[0] if names else NONE})},
            "optional": {
                "compare_with": ([NONE] + names, {"default": NONE}),
                "adapter": ("LORA2",),
                "info": ("LORA2_INFO",),
                "history": ("LORA2_HISTORY",),
            },
        }

    def visualize(self, lora_name=NONE, compare_with=NONE, adapter=None, info=None, history=None):
        import torch

        from lora2_train.format import load_adapter
        from lora2_train.plot import rank_chart

        ranks, labels = [], []
        for name in (lora_name, compare_with):
            if _given(name):
                ranks.append(load_adapter(_pack.lora_path(name)).ranks())
                labels.append(name)
        if adapter is not None:
            ranks.append(adapter.ranks())
            labels.append(adapter.metadata.get("lora2_name") or "adapter")
        if info:
            label = str(info.get("name") or "info")
            if info.get("full_ranks") and info["full_ranks"] != info.get("ranks"):
                ranks.append(dict(info["full_ranks"]))
                labels.append(f"{label} (full)")
                label += " (budget)"
            if info.get("ranks"):
                ranks.append(dict(info["ranks"]))
                labels.append(label)
        history = [h for h in (history or []) if h.get("ranks")]
        if history and not ranks:
            ranks.append(dict(history[-1]["ranks"]))
            labels.append(f"step {history[-1]['step']}")
        if not ranks:
            raise ValueError("Visualize LoRA² Ranks: nothing to chart; choose a lora_name or connect an adapter, "
                             "info or history")
        image = rank_chart(ranks, labels, history=history or None, title="LoRA² ranks")
        return (torch.from_numpy(image).float().div(255.0)[None],)
