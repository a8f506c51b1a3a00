"""The sd-scripts backend from ComfyUI: ``lora2_train.kohya.launch.train_sd_scripts`` in a subprocess
(``num_processes`` > 1: ``accelerate launch --multi_gpu``), with sample prompts every N steps and sd-scripts'
training state kept on Cancel and at the end (``resume_from``)."""
from __future__ import annotations

import logging
import tempfile
import time

from . import choices, data as D, samples as S


def _checkpoint(base_checkpoint):
    import folder_paths

    if base_checkpoint in (None, "", choices.NONE):
        raise ValueError("base_checkpoint: choose the SDXL checkpoint sd-scripts should train on")
    ckpt = folder_paths.get_full_path("checkpoints", base_checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"base_checkpoint {base_checkpoint!r} not found in ComfyUI's checkpoints folders")
    return ckpt


def train_sd_scripts(config, out, inputs, run, extra_options=None):
    """(adapter, history, sample image files) of one sd-scripts run; `inputs` are the node's (settings merged)."""
    import comfy.model_management as mm
    from lora2_train.format import load_adapter
    from lora2_train.kohya.launch import (TrainingCancelled, check_sd_scripts, check_state_dir, sample_images,
                                          sample_prompt_lines, train_sd_scripts as launch, training_options)

    ckpt = _checkpoint(inputs["base_checkpoint"])
    sd_scripts_path, resume_from = inputs["sd_scripts_path"], inputs.get("resume_from") or ""
    sample_every, sample_prompts = int(inputs["sample_every_n_steps"]), inputs["sample_prompts"]
    check_sd_scripts(sd_scripts_path)  # one line naming the folder when it is not a usable checkout
    if resume_from:
        check_state_dir(resume_from)
    if sample_every > 0:
        sample_prompt_lines(sample_prompts)  # one line when there is no prompt
    started = time.time()
    # sample images already there (an earlier, cancelled run of a resumed one) are not this run's, even
    # when written within the mtime slack of `since`
    earlier = {p.name for p in sample_images(out.parent, out.stem)}
    history: list[dict] = []
    shown: set[str] = set(earlier)
    callback = _callback(config, out, run, history, shown, started, sample_every)
    with tempfile.TemporaryDirectory(prefix="lora2_data_") as tmp:
        folder = _folder(inputs, tmp)
        try:
            path = launch(sd_scripts_path, ckpt, folder, str(out.parent), out.stem, config, config.steps,
                          int(inputs["resolution"]), config.batch_size, config.seed,
                          python=inputs["python_path"] or None, callback=callback,
                          should_stop=mm.processing_interrupted, save_every=config.save_every_n_steps or None,
                          extra_options={**training_options(config), **(extra_options or {})},
                          num_processes=int(inputs["num_processes"]),
                          sample_prompts=sample_prompts if sample_every > 0 else None,
                          sample_every=sample_every or None, sample_sampler=inputs["sample_sampler"],
                          resume_from=resume_from or None, save_state=True)
        except TrainingCancelled as e:
            _cancelled(e, run)
    if sample_every > 0:  # written after the last progress line: with the final message
        run.new_samples = run.new_samples + S.sd_scripts_sample_refs(out, started, shown)
    adapter = load_adapter(path)
    if not history:
        history.append({"step": config.steps, "ranks": adapter.ranks(), "loss": float("nan")})
    ours = [p for p in sample_images(out.parent, out.stem, since=started) if p.name not in earlier]
    return adapter, history, ours


def _folder(inputs, tmp):
    """The image folder sd-scripts reads: the dataset folder (checked here, one line), or the images written
    into `tmp` with their captions."""
    from lora2_train.dataset import write_image_folder

    if inputs.get("images") is not None:
        return write_image_folder(D.examples("", inputs["images"], inputs.get("captions", ""),
                                             inputs["instance_prompt"], inputs["resolution"]), tmp)
    D.examples(inputs["dataset_path"], None, "", inputs["instance_prompt"], inputs["resolution"])
    return inputs["dataset_path"]


def _callback(config, out, run, history, shown, started, sample_every):
    from lora2_train.trainer import history_point

    def callback(ev):
        if sample_every > 0:  # sample images sd-scripts wrote since the last step: to the chart
            run.new_samples = S.sd_scripts_sample_refs(out, started, shown) or run.new_samples
        run.step(ev)
        point = history_point(ev, config.resize_every)
        if point is not None:
            history.append(point)

    return callback


def _cancelled(e, run):
    import comfy.model_management as mm

    msg = f"Train LoRA² (sd-scripts): cancelled; {e}"
    if e.state is not None:
        msg += f" (set resume_from to {e.state} to continue)"
    logging.warning(msg)
    run.send(status="interrupted", message=msg, checkpoint=str(e.state) if e.state else None)
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException() from None
