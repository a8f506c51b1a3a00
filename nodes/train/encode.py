"""Encoding the training data and sample prompts with the node's VAE and CLIP (once per run, cached on disk),
and the SDXL ADM vector of an example."""
from __future__ import annotations

import contextlib
import os


def size_of(ex) -> tuple:
    """SDXL's size conditioning of an example: (original height, width, crop top, left, target height, width)."""
    (oh, ow), (top, left), (th, tw) = ex.original_size, ex.crop_top_left, ex.target_size
    return oh, ow, top, left, th, tw


def adm(base, pooled, size):
    """The ADM vector y of one example: the model's own ``encode_adm`` of its pooled text embedding (1, C) and
    its :func:`size_of` tuple."""
    oh, ow, top, left, th, tw = size
    return base.encode_adm(pooled_output=pooled, width=ow, height=oh, crop_w=left, crop_h=top, target_width=tw,
                           target_height=th, device=pooled.device)[0]


def encode_examples(base, clip, vae, examples, captions_only=False, seed=0, cache=None):
    """(latents, context, y) per example: VAE latents scaled by the latent format; CLIP cond + pooled;
    SDXL ADM vector (pooled ‖ original size, crop offset, target size embeddings) from the model's own
    encode_adm.  `captions_only` (text-encoder training): the conditioning is the example's caption index
    and its (original size, crop offset, target size), encoded in every step by :class:`text.TextConditioning`.

    ComfyUI's VAE encode draws from the latent distribution with the global generator: each image is
    encoded under a generator state forked and seeded from the run's `seed`, its pixels and how often the
    same pixels came before in this run (the same images and seed give the same latents, two copies of an
    image two draws; the caller's random state is left as it was).  `cache`
    (:class:`lora2_train.cache.EncodeCache`) keeps the VAE's output per (VAE, pixels, seed, copy) and the
    CLIP's per (CLIP, tokens) on disk, so a later run on the same data skips the encoders."""
    import torch

    from lora2_train.cache import EncodeCache, digest

    cache = cache if cache is not None else EncodeCache(None)
    latents = vae_latents(base, vae, examples, seed, cache)
    if captions_only:
        captions: dict[str, int] = {}
        return [{"latents": lat, "cond": {"caption": torch.tensor(captions.setdefault(ex.caption, len(captions))),
                                          "size": torch.tensor(size_of(ex))}}
                for ex, lat in zip(examples, latents)]
    clip_key = clip_fingerprint(clip) if cache.root is not None else None
    texts = {}
    for caption in dict.fromkeys(ex.caption for ex in examples):
        tokens = clip.tokenize(caption)
        try:
            key = digest("text", clip_key, tokens)
        except TypeError:  # tokens of a kind the key cannot hold: encoded, not kept
            key = None
        hit = cache.get("text", key) if key is not None else None
        if hit is None:
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            hit = {"cond": cond[0].float().cpu(), "pooled": pooled.float().cpu()}
            if key is not None:
                cache.put("text", key, hit)
        texts[caption] = (hit["cond"], hit["pooled"])
    return [{"latents": lat, "cond": {"context": texts[ex.caption][0],
                                      "y": adm(base, texts[ex.caption][1], size_of(ex)).float().cpu()}}
            for ex, lat in zip(examples, latents)]


def vae_latents(base, vae, examples, seed, cache):
    """The examples' VAE latents (scaled by the latent format), each drawn under its own seed (see
    :func:`encode_examples`) or taken from `cache`."""
    from lora2_train.cache import digest

    vae_key = vae_fingerprint(vae) if cache.root is not None else None
    copies: dict[str, int] = {}
    latents = []
    for ex in examples:
        pixels = ex.image.permute(1, 2, 0)[None]  # (1, H, W, 3): ComfyUI's IMAGE layout
        content = digest("pixels", pixels)
        n = copies[content] = copies.get(content, -1) + 1
        key = digest("latent", vae_key, content, int(seed), n)
        hit = cache.get("latents", key)  # (no cache: always None; put writes nothing)
        if hit is not None:
            raw = hit["latent"]
        else:
            with seeded(int(digest("vae-seed", int(seed), content, n)[:15], 16)):
                raw = vae.encode(pixels).float().cpu()
            cache.put("latents", key, {"latent": raw})
        latents.append(base.process_latent_in(raw).float()[0])
    return latents


def encode_prompts(clip, prompts, encode=None):
    """[(positive, negative)] CONDITIONING per prompt, encoded now by the CLIP (or by `encode(text)` → (cond,
    pooled)), as autograd-usable CPU copies; the SDXL size conditioning is the prompt's size."""
    import torch

    if encode is None:
        def encode(text):
            return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)

    cache, out = {}, []
    for p in prompts:
        pair = []
        for text in (p.prompt, p.negative):
            if text not in cache:
                cond, pooled = encode(text)
                with torch.inference_mode(False):
                    cache[text] = (cond.detach().cpu().clone(), pooled.detach().cpu().clone())
            cond, pooled = cache[text]
            size = {"width": p.width, "height": p.height, "target_width": p.width, "target_height": p.height,
                    "crop_w": 0, "crop_h": 0}
            pair.append([[cond, {"pooled_output": pooled, **size}]])
        out.append(tuple(pair))
    return out


@contextlib.contextmanager
def seeded(seed: int):
    """The global generators (CPU and every CUDA device) seeded with `seed` inside, restored afterwards."""
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


#: text and image the encoders' cache keys are computed from (see lora2_train.cache.encoder_fingerprint)
_PROBE_TEXT = "a photo of a red fox sitting in tall grass at sunset, 35mm, detailed fur, bokeh"


def vae_fingerprint(vae) -> str:
    """Cache key of the VAE: its latent of a fixed 64×64 probe image, drawn under a fixed seed."""
    import torch

    from lora2_train.cache import encoder_fingerprint

    probe = (torch.arange(64 * 64 * 3, dtype=torch.float32) * 0.618034 % 1.0).reshape(1, 64, 64, 3)
    with seeded(0):
        return encoder_fingerprint(vae.encode(probe))


def clip_fingerprint(clip) -> str:
    """Cache key of the CLIP (with whatever LoRA is patched into it): its conditioning of a fixed probe text."""
    from lora2_train.cache import encoder_fingerprint

    cond, pooled = clip.encode_from_tokens(clip.tokenize(_PROBE_TEXT), return_pooled=True)
    return encoder_fingerprint(cond, pooled)


def cache_dir():
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "lora2_cache")
