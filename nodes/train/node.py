"""Train LoRA² (SDXL): the essentials on the node, everything else on optional settings nodes; and the
all-inputs node of earlier workflows."""
from __future__ import annotations

from . import request, settings as S

DESCRIPTION = ("Train an SDXL LoRA whose rank is learned per layer (LoRA²), save it into the loras folder and "
               "return the model with it applied.")
RETURN_TYPES = ("MODEL", "CLIP", "LORA2", "LORA2_HISTORY", "STRING", "IMAGE")
RETURN_NAMES = ("model", "clip", "lora2", "rank_history", "info", "samples")
MODELS = {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",)}


class TrainLoRA2:
    """Model, data, steps, learning rate, rank target and cap, seed, backend, name; settings nodes for the rest
    (unconnected: their defaults)."""

    CATEGORY = "LoRA²"
    RETURN_TYPES, RETURN_NAMES = RETURN_TYPES, RETURN_NAMES
    FUNCTION = "train"
    OUTPUT_NODE = True
    DESCRIPTION = DESCRIPTION

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**MODELS, **S.essential_inputs()},
                "optional": {name: (node.KIND, {"tooltip": node.DESCRIPTION}) for name, node in S.SETTINGS.items()},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, model, clip, vae, unique_id=None, **inputs):
        connected = {k: inputs.pop(k) for k in list(inputs) if k in S.SETTINGS}
        unknown = sorted(set(inputs) - set(S.essential_inputs()))
        if unknown:
            raise ValueError(f"Train LoRA² (SDXL): unknown input {unknown[0]!r} (settings belong on the settings "
                             f"nodes)")
        return request.train(model, clip, vae, S.merged(inputs, connected), unique_id)


#: the inputs of the earlier one-node Train LoRA², in its widget order (saved UI workflows list widget values
#: in this order)
LEGACY_REQUIRED = ("dataset_path", "instance_prompt", "steps", "learning_rate", "nu_learning_rate", "r_init", "r_max",
                   "r_target", "q", "lambda_r", "lambda_e", "seed", "resolution", "batch_size", "target_modules",
                   "backend", "output_name")
LEGACY_OPTIONAL = ("images", "captions", "sd_scripts_path", "python_path", "base_checkpoint", "resume_from",
                   "num_processes", "sample_prompts", "sample_every_n_steps", "sample_sampler",
                   "gradient_checkpointing", "optimizer", "mixed_precision", "fp8_base", "full_bf16", "preset",
                   "max_params_millions", "gradient_accumulation_steps", "max_grad_norm", "lr_scheduler",
                   "lr_warmup_steps", "text_encoder_lr", "min_snr_gamma", "noise_offset", "loss_type", "huber_c",
                   "save_every_n_steps", "aspect_buckets", "min_bucket_reso", "max_bucket_reso", "cache_to_disk",
                   "latents", "positive", "beta")


def all_inputs() -> dict:
    """Every training input's widget or link, by name."""
    return {**S.essential_inputs(), **S.rank_inputs(), **S.training_inputs(), **S.dataset_inputs(),
            **S.dataset_links(), **S.sample_inputs(), **S.sd_scripts_inputs()}


class TrainLoRA2Legacy:
    """The one-node Train LoRA² of earlier workflows (every input on it): kept so that they load and run as
    before; it trains exactly as Train LoRA² (SDXL) with the same values on its settings nodes."""

    CATEGORY = "LoRA²/legacy"
    RETURN_TYPES, RETURN_NAMES = RETURN_TYPES, RETURN_NAMES
    FUNCTION = "run"
    OUTPUT_NODE = True
    DEPRECATED = True  # current ComfyUI hides it from search; saved workflows still find it
    INPUT_IS_LIST = True  # image / text / latent lists of ComfyUI's dataset nodes arrive whole, in one call
    DESCRIPTION = DESCRIPTION + " (Earlier all-inputs node: new workflows use Train LoRA² (SDXL) with settings nodes.)"

    @classmethod
    def INPUT_TYPES(cls):
        spec = all_inputs()
        return {"required": {**MODELS, **{k: spec[k] for k in LEGACY_REQUIRED}},
                "optional": {k: spec[k] for k in LEGACY_OPTIONAL}, "hidden": {"unique_id": "UNIQUE_ID"}}

    def run(self, **inputs):
        given = S.unlisted(inputs, "Train LoRA² (SDXL, legacy)")
        model, clip, vae, unique_id = (given.pop(k, None) for k in ("model", "clip", "vae", "unique_id"))
        values = S.merged({}, {})
        values.update(given)
        return request.train(model, clip, vae, values, unique_id)
