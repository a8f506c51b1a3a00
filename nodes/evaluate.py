"""Score Images (DINO / CLIP) and DreamBooth Prompt: the evaluation of ``lora2_train.evaluate`` as nodes.

Models are folders saved with ``save_pretrained`` under ComfyUI's ``models/lora2_eval`` (registered here with
``folder_paths``; extra_model_paths.yaml may add folders under the key ``lora2_eval``).  The loaded models stay
cached between runs while the same folders are chosen.  Nothing is downloaded.
"""
from __future__ import annotations

import os

from . import _pack

_pack.register_eval_folder()

NONE = "(none)"


def _device() -> str:
    try:
        import comfy.model_management as mm  # ComfyUI's device choice (honours --cpu)

        return str(mm.get_torch_device())
    except ImportError:
        from lora2_train.evaluate import default_device

        return default_device()


class ScoreImages:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("FLOAT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("dino", "clip_i", "clip_t", "summary")
    FUNCTION = "score"
    OUTPUT_NODE = True
    DESCRIPTION = ("DINO (subject fidelity), CLIP-I (similarity to the reference photos) and CLIP-T (agreement with "
                   "the prompt) of an IMAGE batch, as raw mean cosines. References: a folder (absolute, or inside "
                   "ComfyUI's input folder) and/or an IMAGE batch. Models: folders saved with save_pretrained in "
                   "models/lora2_eval (a DINO ViT such as facebook/dino-vits16, and a CLIP model).")
    _cache: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        names = _pack.eval_model_names()
        return {
            "required": {
                "images": ("IMAGE",),
                "prompts": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "one line for every image, or one line per image of the batch"}),
                "dino_model": (names or [NONE],),
                "clip_model": (names or [NONE],),
                "references_folder": ("STRING", {"default": "",
                                                 "tooltip": "folder of the subject's photos: absolute, or relative "
                                                            "to ComfyUI's input folder"}),
                "batch_size": ("INT", {"default": 16, "min": 1, "max": 1024}),
            },
            "optional": {"reference_images": ("IMAGE",)},
        }

    def _scorer(self, clip_model: str, dino_model: str, batch_size: int):
        from lora2_train.evaluate import EvalError, Scorer

        for role, name in (("dino_model", dino_model), ("clip_model", clip_model)):
            if name in (None, "", NONE):
                raise EvalError(f"{role}: no model folder chosen; put a folder saved with save_pretrained in "
                                f"ComfyUI's models/{_pack.EVAL_FOLDER}")
        clip, dino = _pack.eval_model_path(clip_model), _pack.eval_model_path(dino_model)
        key = (clip, os.path.getmtime(os.path.join(clip, "config.json")), dino,
               os.path.getmtime(os.path.join(dino, "config.json")), _device())
        cache = ScoreImages._cache
        if cache.get("key") != key:
            cache.clear()
            cache.update(key=key, scorer=Scorer(clip, dino, device=key[-1], batch_size=batch_size,
                                                 options=("clip_model", "dino_model")))
        scorer = cache["scorer"]
        scorer.batch_size = int(batch_size)
        return scorer

    def score(self, images, prompts, dino_model, clip_model, references_folder="", batch_size=16,
              reference_images=None):
        from lora2_train.evaluate import (EvalError, comfy_to_pil, embed_folder, list_images, prompts_for_batch,
                                          summary_line)

        generated = comfy_to_pil(images)
        matched = prompts_for_batch(prompts, len(generated), "prompts")
        folder = references_folder.strip()
        if not folder and reference_images is None:
            raise EvalError("no references: give references_folder or connect reference_images")
        if folder:
            folder = _pack.input_path(folder)
            list_images(folder, "reference images")  # a bad folder fails before the models load
        scorer = self._scorer(clip_model, dino_model, batch_size)
        parts = []
        if folder:
            parts.append(embed_folder(scorer, folder, "reference images", note=lambda m: print(f"[LoRA²] {m}")))
        if reference_images is not None:
            refs = comfy_to_pil(reference_images)
            parts.append(scorer.embed_images(refs, [f"reference_images[{i}]" for i in range(len(refs))]))
        references = parts[0] if len(parts) == 1 else _concat(parts)
        result = scorer.score(scorer.embed_images(generated, [f"image {i}" for i in range(len(generated))]),
                              references, matched)
        summary = summary_line(result)
        ui = {k: result[k] for k in ("dino", "clip_i", "clip_t", "n_images", "n_references")}
        ui["per_image"] = result["per_image"]
        return {"ui": {"text": [summary], "lora2_scores": [ui]},
                "result": (result["dino"], result["clip_i"], result["clip_t"], summary)}


def _concat(parts):
    import torch

    from lora2_train.evaluate import Embeddings

    return Embeddings([n for p in parts for n in p.names], torch.cat([p.dino for p in parts]),
                      torch.cat([p.clip for p in parts]))


class DreamBoothPrompt:
    CATEGORY = "LoRA²"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("prompt", "all_prompts")
    FUNCTION = "prompt"
    DESCRIPTION = ("One of the 25 DreamBooth evaluation prompts for an object or a live subject, filled with the "
                   "subject's token and class (e.g. 'a sks dog on the beach'); all_prompts: the 25, one per line.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "kind": (["live", "object"], {"default": "live"}),
            "index": ("INT", {"default": 0, "min": 0, "max": 24, "tooltip": "which of the 25 prompts (0–24)"}),
            "token": ("STRING", {"default": "sks"}),
            "class_name": ("STRING", {"default": "dog"}),
        }}

    def prompt(self, kind, index, token, class_name):
        from lora2_train.evaluate import EvalError, dreambooth_prompts

        prompts = dreambooth_prompts(kind, token, class_name)
        if not 0 <= int(index) < len(prompts):
            raise EvalError(f"index {index}: the {kind} list has {len(prompts)} prompts (0–{len(prompts) - 1})")
        return (prompts[int(index)], "\n".join(prompts))
