"""The settings nodes of Train LoRA² (SDXL) and every training input's widget, one place.

Each settings node turns its widgets into one value of its own type (a dict of input name → value) that the
train node takes on an optional input; an unconnected input means that node's defaults.  The defaults are
``LoRA2Config``'s where it has the field; the node's own differ where a GPU run of SDXL wants it:
gradient checkpointing on, AdamW, bf16 for sd-scripts, resolution 1024.
"""
from __future__ import annotations

from . import choices
from .. import _pack  # noqa: F401  (puts lora2_train on sys.path inside ComfyUI)
from lora2_train.config import LoRA2Config as D  # noqa: E402


def _f(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


def _i(default, lo, hi, tip, step=1):
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


def _b(default, tip):
    return ("BOOLEAN", {"default": default, "tooltip": tip})


def essential_inputs() -> dict:
    """The train node's own widgets."""
    return {
        "dataset_path": ("STRING", {"default": "", "tooltip": "folder of images; name.txt beside name.png is its "
                                    "caption (else the instance prompt). Or connect a LoRA² Dataset"}),
        "instance_prompt": ("STRING", {"default": "photo of sks person", "multiline": False, "tooltip":
                                       "caption of every image without a caption of its own"}),
        "steps": _i(D.steps, 1, 100000, "optimizer steps"),
        "learning_rate": _f(D.lr, 1e-7, 1.0, 1e-6, "learning rate of the LoRA weights (the ranks' follows it)"),
        "r_target": _i(D.r_target, 1, 4096, "rank the modules the data does not need settle at (L_reg's rank "
                       "term pulls toward it)"),
        "r_max": _i(D.r_max, 1, 4096, "no module grows beyond this rank"),
        "seed": _i(D.seed, 0, 0xFFFFFFFF, "seed of everything random in training (data order, noise, new rank "
                   "positions, VAE draws)"),
        "resolution": _i(1024, 64, 4096, "training side length; with aspect buckets, the pixel count "
                         "resolution² is kept", step=8),
        "batch_size": _i(D.batch_size, 1, 64, "images per micro-batch"),
        "target_modules": (choices.presets(), {"default": "attn", "tooltip": "layers that get LoRAs: attn (the "
                           "paper's attention projections), all, or with the text encoders (te_attn, te_mlp)"}),
        "backend": (list(choices.BACKENDS), {"default": "embedded", "tooltip": "embedded: in this ComfyUI "
                    "process on its MODEL; sd-scripts: a kohya sd-scripts checkout (connect LoRA² sd-scripts)"}),
        "output_name": ("STRING", {"default": "lora2_sdxl", "tooltip": "file name in the loras folder (a taken "
                        "name gets _2, _3 …)"}),
    }


def rank_inputs() -> dict:
    """LoRA² Rank Settings: the rank distribution and L_reg (spec §2–3)."""
    return {
        "r_init": _i(D.r_init, 1, 4096, "rank of every module at step 0"),
        "q": ("FLOAT", {"default": D.q, "min": 0.01, "max": 0.999, "step": 0.01, "tooltip": "quantile of the "
                        "rank distribution that sets the effective rank D(ν)"}),
        "lambda_r": _f(D.lambda_r, 0.0, 1000.0, 0.01, "weight λ_r of L_reg (rank pull toward r_target + weight "
                       "term)"),
        "lambda_e": _f(D.lambda_e, 0.0, 1000.0, 0.01, "weight λ_e of the cross-attention entropy term (0: off)"),
        "beta": _f(D.beta, 0.0, 1e9, 100.0, "weight term β of L_reg (price of LoRA weight per element, relative "
                   "to the starting loss): raising it drops weak rank positions, so ranks and the file get "
                   "smaller; lowering it keeps more"),
        "nu_learning_rate": _f(D.nu_lr, 0.0, 10.0, 1e-4, "learning rate of the rank parameters; 0: 25 × "
                               "learning_rate, which keeps the ranks' pace matched to the weights' at any "
                               "learning rate"),
        "rank_block": _i(D.rank_block, 1, 256, "ranks move in multiples of this"),
        "resize_every": _i(D.resize_every, 1, 100000, "re-allocate the ranks every N optimizer steps"),
        "max_params_millions": _f(D.max_params / 1e6, 0.0, 10000.0, 0.1, "cap on the LoRA parameters while training, positions "
                                  "allotted by importance; 0: none"),
    }


def training_inputs() -> dict:
    """LoRA² Training Settings: optimizer, schedule, loss and saving (both backends)."""
    from lora2_train.config import LOSS_TYPES
    from lora2_train.lr_schedule import LR_SCHEDULERS

    return {
        "optimizer": (choices.optimizers(), {"default": "adamw", "tooltip": "adamw8bit needs bitsandbytes, "
                      "prodigy prodigyopt (learning_rate 1.0), lion lion-pytorch; ν keeps nu_learning_rate"}),
        "gradient_checkpointing": _b(True, "recompute U-Net blocks in the backward pass: far less memory, about "
                                     "30% more time"),
        "mixed_precision": (list(choices.PRECISIONS), {"default": "bf16", "tooltip": "sd-scripts backend (the "
                            "embedded backend follows the model's dtype)"}),
        "lr_scheduler": (list(LR_SCHEDULERS), {"default": D.lr_scheduler, "tooltip": "learning-rate schedule"}),
        "lr_warmup_steps": _i(D.lr_warmup_steps, 0, 100000, "linear warm-up steps"),
        "gradient_accumulation_steps": _i(D.gradient_accumulation_steps, 1, 1024, "micro-batches of batch_size "
                                          "per optimizer step"),
        "max_grad_norm": _f(D.max_grad_norm, 0.0, 1000.0, 0.01, "clip the gradient norm (0 = off)"),
        "text_encoder_lr": _f(D.text_encoder_lr, 0.0, 1.0, 1e-6, "learning rate of the text-encoder LoRAs "
                              "(target_modules with te_attn; both backends); 0 = learning_rate"),
        "min_snr_gamma": _f(D.min_snr_gamma, 0.0, 100.0, 0.1, "min-SNR-γ loss weighting (0 = off; 5 is usual)"),
        "noise_offset": _f(D.noise_offset, 0.0, 1.0, 0.01, "noise offset (0 = off)"),
        "loss_type": (list(LOSS_TYPES), {"default": D.loss_type, "tooltip": "mse or pseudo-Huber"}),
        "huber_c": _f(D.huber_c, 0.001, 10.0, 0.001, "pseudo-Huber threshold (loss_type huber)"),
        "save_every_n_steps": _i(D.save_every_n_steps, 0, 100000, "also save <name>_step<k>.safetensors every "
                                 "k steps (0 = off)"),
        "resume_from": ("STRING", {"default": "", "tooltip": "embedded: checkpoint.pt of an earlier run; "
                                   "sd-scripts: its state folder (<name>-step<N>-state beside the adapter, "
                                   "written on Cancel, or <name>-state at the end)"}),
    }


def dataset_inputs() -> dict:
    """LoRA² Dataset: images with captions, or ComfyUI latents with conditioning; buckets and the cache."""
    return {
        "aspect_buckets": _b(True, "train each image at the bucket of about resolution² pixels nearest its "
                             "aspect ratio (else a square crop)"),
        "min_bucket_reso": _i(256, 64, 8192, "shortest bucket side", step=64),
        "max_bucket_reso": _i(2048, 64, 8192, "longest bucket side", step=64),
        "cache_to_disk": _b(True, "embedded backend: keep the VAE latents and caption embeddings in "
                            "output/lora2_cache, keyed by the pixels, captions, encoders and seed, so a later run "
                            "on the same data skips encoding"),
        "captions": ("STRING", {"default": "", "tooltip": "with images: one caption for all, or one per image "
                                "separated by |"}),
    }


def dataset_links() -> dict:
    return {
        "images": ("IMAGE", {"tooltip": "an IMAGE batch or the image list of ComfyUI's dataset nodes, instead "
                             "of the train node's dataset_path"}),
        "latents": ("LATENT", {"tooltip": "latents of ComfyUI's dataset nodes (MakeTrainingDataset, "
                               "ResolutionBucket) or a LATENT batch, instead of the images"}),
        "positive": ("CONDITIONING", {"tooltip": "with latents: their text conditioning (one per latent or one "
                                      "for all)"}),
    }


def sample_inputs() -> dict:
    """LoRA² Samples: sample images while training."""
    return {
        "sample_prompts": ("STRING", {"default": "", "multiline": True, "tooltip": "one prompt per line, "
                                      "sd-scripts options may follow: --w 512 --h 512 (size) --s 12 (steps) --l 5 "
                                      "(cfg) --d 1 (seed) --n blurry (negative prompt); embedded backend: "
                                      "defaults 512×512, 12 steps, cfg 5, the node's seed, also --ss <sampler>; "
                                      "images are returned as `samples` and shown in the chart"}),
        "sample_every_n_steps": _i(0, 0, 100000, "sample the prompts every N optimizer steps (0: no samples); "
                                   "embedded: with ComfyUI's sampler on the model being trained, without effect on "
                                   "the training"),
        "sample_sampler": (list(choices.SAMPLERS), {"default": "euler_a", "tooltip": "sd-scripts sampler names; "
                           "embedded backend: ComfyUI's sampler of the same kind with scheduler normal ("
                           + choices.sampler_map() + ")"}),
    }


def sd_scripts_inputs() -> dict:
    """LoRA² sd-scripts: the checkout, its Python and the backend-only options."""
    return {
        "sd_scripts_path": ("STRING", {"default": "", "tooltip": "kohya sd-scripts checkout (else SD_SCRIPTS_DIR)"}),
        "python_path": ("STRING", {"default": "", "tooltip": "Python of sd-scripts' own environment (empty: this "
                                   "one)"}),
        "base_checkpoint": ([choices.NONE] + choices.checkpoint_names(), {"default": choices.NONE, "tooltip":
                            "the SDXL checkpoint sd-scripts trains on (the MODEL input is not passed to it)"}),
        "num_processes": _i(1, 1, 64, "one training process per GPU (accelerate launch --multi_gpu)"),
        "fp8_base": _b(False, "base U-Net in fp8"),
        "full_bf16": _b(False, "LoRA weights and gradients in bf16 (ν stays float32); needs mixed_precision bf16"),
        "preset": (["none", *choices.vram_presets()], {"default": "none", "tooltip": "GPU memory preset; replaces "
                   "resolution, batch_size, gradient_checkpointing, optimizer, mixed_precision, fp8_base, "
                   "full_bf16 and max_params, and caches latents on disk"}),
    }


def defaults(inputs: dict) -> dict:
    """Input name → default of a widget table (link inputs: None)."""
    return {k: (spec[1].get("default") if len(spec) > 1 else None) for k, spec in inputs.items()}


class _Settings:
    """A settings node: its widgets → one value of its type, ``{"settings": KIND, input: value, …}``."""

    CATEGORY = "LoRA²/training"
    FUNCTION = "settings"
    KIND = ""
    INPUTS = staticmethod(dict)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": cls.INPUTS()}

    @classmethod
    def defaults(cls) -> dict:
        return defaults(cls.INPUTS())

    def settings(self, **values):
        return ({"settings": self.KIND, **values},)


def _settings_node(name: str, kind: str, output: str, inputs, description: str) -> type:
    """A settings node class: widgets `inputs()` → one `kind` value on output `output`."""
    return type(name, (_Settings,), {"KIND": kind, "RETURN_TYPES": (kind,), "RETURN_NAMES": (output,),
                                     "INPUTS": staticmethod(inputs), "DESCRIPTION": description,
                                     "__doc__": description, "__module__": __name__})


RankSettings = _settings_node(
    "RankSettings", "LORA2_RANK_SETTINGS", "rank_settings", rank_inputs,
    "How ranks are learned: starting rank, quantile q, λ_r, λ_e, weight term β, ν learning rate.")
TrainingSettings = _settings_node(
    "TrainingSettings", "LORA2_TRAINING_SETTINGS", "training_settings", training_inputs,
    "Optimizer, precision, schedule, accumulation, clipping, loss, snapshots, resume.")
SampleSettings = _settings_node(
    "SampleSettings", "LORA2_SAMPLES", "samples", sample_inputs,
    "Sample prompts drawn every N steps while training (shown in the chart, returned as samples).")
SdScriptsSettings = _settings_node(
    "SdScriptsSettings", "LORA2_SD_SCRIPTS", "sd_scripts", sd_scripts_inputs,
    "The sd-scripts backend: checkout, Python, base checkpoint, processes, fp8 / bf16, presets.")


#: inputs that stay lists (an INPUT_IS_LIST node gets every input as a list)
LIST_INPUTS = ("images", "captions", "latents", "positive")


def unlisted(inputs: dict, node: str) -> dict:
    """The inputs of an INPUT_IS_LIST node: one value each, except :data:`LIST_INPUTS` (a one-caption list is
    its caption; a list of unconnected links is None)."""
    out = {}
    for k, v in inputs.items():
        if k in LIST_INPUTS or not isinstance(v, list):
            out[k] = v
        elif len(v) != 1:
            raise ValueError(f"{node}: input {k!r} got a list of {len(v)} values; it takes one")
        else:
            out[k] = v[0]
    if isinstance(out.get("captions"), list) and len(out["captions"]) == 1:
        out["captions"] = out["captions"][0]
    for k in ("images", "latents", "positive"):
        if isinstance(out.get(k), list) and all(v is None for v in out[k]):
            out[k] = None
    return out


class DatasetSettings(_Settings):
    """Images (a batch or ComfyUI's image lists) with captions, or latents with conditioning, arrive whole."""

    KIND = "LORA2_DATASET"
    RETURN_TYPES = (KIND,)
    RETURN_NAMES = ("dataset",)
    FUNCTION = "run"
    INPUT_IS_LIST = True
    INPUTS = staticmethod(dataset_inputs)
    DESCRIPTION = ("Training data other than the train node's folder: IMAGE (+ captions) or LATENT + "
                   "CONDITIONING of ComfyUI's dataset nodes; aspect buckets; the encoding cache.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dataset_inputs(), "optional": dataset_links()}

    @classmethod
    def defaults(cls) -> dict:
        return {**defaults(dataset_inputs()), **defaults(dataset_links())}

    def run(self, **inputs):
        return self.settings(**unlisted(inputs, "LoRA² Dataset"))


#: the train node's optional settings inputs: input name → settings node
SETTINGS = {"rank_settings": RankSettings, "training_settings": TrainingSettings, "dataset": DatasetSettings,
            "samples": SampleSettings, "sd_scripts": SdScriptsSettings}


def merged(essentials: dict, connected: dict) -> dict:
    """Every training input by name: the essentials, then each settings value given in `connected` (input
    name → value) or else that node's defaults; a value of the wrong kind is a one-line error."""
    out = dict(essentials)
    for name, node in SETTINGS.items():
        value = connected.get(name)
        if value is not None and (not isinstance(value, dict) or value.get("settings") != node.KIND):
            raise ValueError(f"Train LoRA² (SDXL): input {name!r} takes a {node.KIND} value (node "
                             f"{node.__name__}), got {type(value).__name__}")
        out.update(node.defaults())
        out.update({k: v for k, v in (value or {}).items() if k != "settings"})
    return out
