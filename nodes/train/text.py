"""Text-encoder training in ComfyUI: SDXL's two CLIP encoders get LoRAs, and each step recomputes the
captions' conditioning through them with gradients."""
from __future__ import annotations

from .encode import adm


def trains_text_encoders(config) -> bool:
    from lora2_train.network import TE_GROUPS

    return any(g in TE_GROUPS for g in config.targets)


def text_encoders(clip):
    """(CLIP-L, CLIP-G) modules of an SDXL CLIP, whose Linear layers get the lora_te1_ / lora_te2_ LoRAs (the
    names ComfyUI's LoRA loader maps back onto the same modules), or a one-line error."""
    if clip is None:
        raise ValueError("clip: text-encoder targets need the CLIP input connected")
    m = clip.cond_stage_model
    encoders = (getattr(m, "clip_l", None), getattr(m, "clip_g", None))
    if any(e is None for e in encoders):
        raise ValueError(f"clip: text-encoder targets need SDXL's two text encoders (clip_l, clip_g); this CLIP is "
                         f"{type(m).__name__}")
    return encoders


class TextConditioning:
    """The conditioning of a batch recomputed through ComfyUI's CLIP with gradients (text-encoder training):
    each caption's tokens (tokenized once) → CLIP-L ‖ CLIP-G hidden states (context) and CLIP-G's pooled
    output → the model's own ``encode_adm`` with the example's original size, crop offset and target size
    (y).  The CLIP's clip-skip setting (CLIPSetLastLayer) is honoured as in ``CLIP.encode_from_tokens``; the
    model is not (re)loaded here: ``memory.load_for_training`` loaded it once."""

    def __init__(self, clip, base, encoders, captions):
        self.clip, self.base, self.encoders = clip, base, encoders
        self.tokens = [clip.tokenize(c) for c in captions]

    def _encode(self, i):
        return self._encode_tokens(self.tokens[i])

    def encode_text(self, text):
        """(cond, pooled) of `text` through the encoders as they are now (with their LoRAs)."""
        return self._encode_tokens(self.clip.tokenize(text))

    def _encode_tokens(self, tokens):
        m = self.clip.cond_stage_model
        m.reset_clip_options()
        if getattr(self.clip, "layer_idx", None) is not None:
            m.set_clip_options({"layer": self.clip.layer_idx})
        # current ComfyUI runs the encoders on the patcher's device (older versions ignore the option)
        m.set_clip_options({"execution_device": self.clip.patcher.load_device})
        out = m.encode_token_weights(tokens)
        return out[0], out[1]

    def __call__(self, caption, size, device):
        """(context (B, T, C), y (B, adm)) on `device` for caption indices (B,) and sizes (B, 6)."""
        import torch

        ids = [int(i) for i in caption.tolist()]
        encoded = {i: self._encode(i) for i in dict.fromkeys(ids)}  # each caption of the batch once
        contexts, ys = [], []
        for i, hw in zip(ids, size.tolist()):
            cond, pooled = encoded[i]
            contexts.append(cond[0].to(device))
            ys.append(adm(self.base, pooled, hw).to(device))
        return torch.stack(contexts), torch.stack(ys)
