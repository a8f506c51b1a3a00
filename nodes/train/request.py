"""One training request of the node: its inputs (settings merged) → ``LoRA2Config`` + backend options → the
backend → the saved adapter applied to the MODEL and CLIP, with the node's outputs."""
from __future__ import annotations

from . import choices, embedded, progress, sd_scripts
from .samples import images_tensor


def _preset(inputs: dict) -> bool:
    """Apply an sd-scripts GPU memory preset to `inputs` in place; True when one was chosen."""
    preset = inputs.get("preset")
    if preset in (None, "", "none"):
        return False
    from lora2_train.kohya.launch import vram_preset

    if inputs["backend"] != "sd-scripts":
        raise ValueError(f"preset {preset!r}: GPU memory presets are for the sd-scripts backend")
    p = vram_preset(preset)
    inputs.update({k: p[k] for k in ("resolution", "batch_size", "optimizer", "gradient_checkpointing",
                                     "mixed_precision", "fp8_base", "full_bf16")})
    inputs["max_params_millions"] = p["max_params"] / 1e6
    return True


def config_of(inputs: dict):
    """The run's LoRA2Config from the node's inputs."""
    from lora2_train.config import LoRA2Config

    steps = int(inputs["steps"])
    return LoRA2Config(
        q=float(inputs["q"]), r_init=int(inputs["r_init"]), r_target=int(inputs["r_target"]),
        r_max=int(inputs["r_max"]), rank_block=int(inputs["rank_block"]), resize_every=int(inputs["resize_every"]),
        lambda_r=float(inputs["lambda_r"]), lambda_e=float(inputs["lambda_e"]), lr=float(inputs["learning_rate"]),
        beta=float(inputs["beta"]), nu_lr=float(inputs["nu_learning_rate"]), steps=steps,
        batch_size=int(inputs["batch_size"]), seed=int(inputs["seed"]),
        targets=choices.targets(inputs["target_modules"]), text_encoder_lr=float(inputs["text_encoder_lr"]),
        checkpoint_every=max(1, min(100, steps)), gradient_checkpointing=bool(inputs["gradient_checkpointing"]),
        optimizer=inputs["optimizer"], max_params=int(round(float(inputs["max_params_millions"]) * 1e6)),
        # the embedded backend picks its precision from the model (see embedded._compute_dtype)
        mixed_precision=inputs["mixed_precision"] if inputs["backend"] == "sd-scripts" else "no",
        gradient_accumulation_steps=int(inputs["gradient_accumulation_steps"]),
        max_grad_norm=float(inputs["max_grad_norm"]), lr_scheduler=inputs["lr_scheduler"],
        lr_warmup_steps=int(inputs["lr_warmup_steps"]), min_snr_gamma=float(inputs["min_snr_gamma"]),
        noise_offset=float(inputs["noise_offset"]), loss_type=inputs["loss_type"], huber_c=float(inputs["huber_c"]),
        save_every_n_steps=int(inputs["save_every_n_steps"]))


def _check(inputs: dict) -> None:
    if inputs.get("latents") is not None and inputs["backend"] != "embedded":
        raise ValueError("latents: the latents/positive inputs train with the embedded backend only")
    if inputs["backend"] == "embedded" and int(inputs["num_processes"]) != 1:
        raise ValueError("num_processes > 1 needs backend sd-scripts (the embedded backend trains in one process)")
    if int(inputs["sample_every_n_steps"]) < 0:
        raise ValueError(f"sample_every_n_steps must be at least 0, got {inputs['sample_every_n_steps']}")


def train(model, clip, vae, inputs: dict, unique_id=None):
    """Train with every input of the node given by name in `inputs`; the node's result (ui + outputs)."""
    import folder_paths

    from ..load import patch_with_adapter
    from ..tools import free_path

    inputs = dict(inputs)
    if inputs["backend"] not in choices.BACKENDS:
        raise ValueError(f"backend must be one of {choices.BACKENDS}, got {inputs['backend']!r}")
    use_preset = _preset(inputs)
    _check(inputs)
    config = config_of(inputs)
    buckets = None
    if inputs["aspect_buckets"]:
        from lora2_train.dataset import bucket_sizes

        buckets = bucket_sizes(int(inputs["resolution"]), int(inputs["min_bucket_reso"]),
                               int(inputs["max_bucket_reso"]))
    # a taken name gets _2, _3 …: queuing a run twice never fails
    out = free_path(folder_paths.get_folder_paths("loras")[0], inputs["output_name"])
    run = progress.Run(unique_id, config.steps)
    if inputs["backend"] == "sd-scripts":
        from lora2_train.kohya.launch import cache_options, precision_options

        extra = precision_options(bool(inputs["fp8_base"]), bool(inputs["full_bf16"]))
        if use_preset:
            extra.update(cache_options(config))
        adapter, history, samples = sd_scripts.train_sd_scripts(config, out, inputs, run, extra)
    else:
        adapter, history, samples = embedded.train_embedded(model, clip, vae, config, out, inputs, run, buckets)
    out = run.saved_as or out
    model_out, clip_out = patch_with_adapter(model, clip, adapter, 1.0, 1.0, out.name)
    info = progress.info_line(out, inputs["output_name"], adapter, history, run)
    run.send(status="done", saved=out.name, ranks_by_block=progress.block_means(adapter.ranks()), message=info,
             **run.take_samples(), **run.memory())
    return {"ui": {"lora2_saved": [out.name], "text": [info]},
            "result": (model_out, clip_out, adapter, history, info, images_tensor(samples))}
