"""The training examples of the node's inputs: a folder, IMAGE batches with captions, or ComfyUI latents with
their conditioning."""
from __future__ import annotations


def examples(dataset_path, images, captions, instance_prompt, resolution, buckets=None):
    """Examples of `images` (a batch or a list of them, :func:`lora2_train.dataset.from_image_batches`) or,
    without images, of the folder `dataset_path`."""
    from lora2_train import dataset as D

    if images is not None:
        return D.from_image_batches(images, captions, resolution, instance_prompt, buckets)
    return D.load_folder(dataset_path, resolution, instance_prompt, buckets)


def data_from_latents(base, latents, positive):
    """Training examples from ComfyUI latents and conditioning: a LATENT (``{"samples": (B, C, h, w)}``) or a
    list of them (MakeTrainingDataset: one per image; ResolutionBucket: one batch per bucket), with a
    CONDITIONING (``[[cond, {"pooled_output": …}], …]``) or a list of them: one per LATENT, or one for all.
    Within a LATENT of B samples, the conditioning holds one entry per sample or one for all, and an entry's
    cond / pooled tensors one row per sample or one for all."""
    import torch

    lats = latents if isinstance(latents, (list, tuple)) else [latents]
    if not lats or not all(isinstance(d, dict) and isinstance(d.get("samples"), torch.Tensor) for d in lats):
        raise ValueError("latents: expected LATENT values ({'samples': tensor})")
    if positive is None:
        raise ValueError("positive: latents need their text conditioning (connect positive)")
    conds = list(positive) if isinstance(positive, (list, tuple)) else [positive]
    if conds and is_cond_entry(conds[0]):  # one CONDITIONING rather than a list of them
        conds = [conds]
    if len(conds) not in (1, len(lats)):
        raise ValueError(f"positive: {len(conds)} conditionings for {len(lats)} latents; give one per latent or "
                         f"one for all")
    data = []
    for i, d in enumerate(lats):
        samples = d["samples"]
        if samples.dim() != 4:
            raise ValueError(f"latents[{i}]: samples must be (batch, channels, height, width), got "
                             f"{tuple(samples.shape)}")
        cond = conds[i if len(conds) > 1 else 0]
        if not cond or not all(is_cond_entry(e) for e in cond):
            raise ValueError(f"positive[{i if len(conds) > 1 else 0}]: not a CONDITIONING ([[tensor, dict], …])")
        b = samples.shape[0]
        if len(cond) not in (1, b):
            raise ValueError(f"positive[{i}]: {len(cond)} entries for {b} latents; one per latent or one for all")
        x = base.process_latent_in(samples.float()).float().cpu()
        for j in range(b):
            tensor, extra = cond[j if len(cond) > 1 else 0]
            pooled = extra.get("pooled_output")
            if pooled is None:
                raise ValueError(f"positive[{i}]: no pooled_output (an SDXL text encoder's conditioning is needed)")
            row = j if tensor.shape[0] == b else 0
            prow = j if pooled.shape[0] == b else 0
            h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
            y = base.encode_adm(pooled_output=pooled[prow:prow + 1], width=int(extra.get("width", w)),
                                height=int(extra.get("height", h)), crop_w=int(extra.get("crop_w", 0)),
                                crop_h=int(extra.get("crop_h", 0)), target_width=int(extra.get("target_width", w)),
                                target_height=int(extra.get("target_height", h)), device=pooled.device)
            data.append({"latents": x[j], "cond": {"context": tensor[row].float().cpu(), "y": y[0].float().cpu()}})
    return data


def is_cond_entry(e) -> bool:
    import torch

    return isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor) and isinstance(e[1], dict)
