"""The choice lists of the training widgets (read when ComfyUI asks for the node's inputs)."""
from __future__ import annotations

from .. import _pack  # noqa: F401  (puts lora2_train on sys.path inside ComfyUI)

NONE = "(none)"
BACKENDS = ("embedded", "sd-scripts")
PRECISIONS = ("bf16", "fp16", "no")
#: sd-scripts' sample samplers (lora2_train.kohya.launch.SAMPLERS; kept here so the node lists them without
#: importing the launcher at ComfyUI start)
SAMPLERS = ("euler_a", "euler", "ddim", "pndm", "lms", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
#: `target_modules` choices that add LoRAs on SDXL's two text encoders (CLIP-L: lora_te1_, CLIP-G: lora_te2_) to
#: the paper's attention targets; they train at `text_encoder_lr`
TEXT_ENCODER_CHOICES = {
    "attn+te_attn": "attn1,attn2,te_attn",
    "attn+te_attn+te_mlp": "attn1,attn2,te_attn,te_mlp",
}


def checkpoint_names() -> list[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    return folder_paths.get_filename_list("checkpoints")


def optimizers() -> list[str]:
    from lora2_train.optim import OPTIMIZERS

    return ["adamw"] + [o for o in OPTIMIZERS if o != "adamw"]


def vram_presets() -> list[str]:
    from lora2_train.kohya.launch import VRAM_PRESETS

    return list(VRAM_PRESETS)


def sampler_map() -> str:
    from lora2_train.sample_prompts import COMFY_SAMPLERS

    return ", ".join(f"{k}→{v}" for k, v in COMFY_SAMPLERS.items() if not k.startswith("k_"))


def presets() -> list[str]:
    from lora2_train.config import TARGET_PRESETS

    return list(TARGET_PRESETS) + list(TEXT_ENCODER_CHOICES)


def targets(target_modules: str) -> str:
    """The node's `target_modules` choice as LoRA2Config targets (a preset name or a comma list of groups)."""
    return TEXT_ENCODER_CHOICES.get(target_modules, target_modules)
