"""The U-Net as the trainer's model: ε̂ = diffusion_model(x_t, t, context, y), optionally with the
conditioning recomputed through the text encoders in every step."""
from __future__ import annotations


class UNetCall:
    """ε̂ = diffusion_model(x_t, t, context, y) in the model's compute dtype, returned in float32."""

    BLOCKS = ("BasicTransformerBlock", "ResBlock")

    def __init__(self, unet, dtype):
        self.unet, self.dtype = unet, dtype
        self._patched = []

    def __call__(self, x_t, t, context, y):
        d = self.dtype
        return self.unet(x_t.to(d), t.float(), context=context.to(d), y=y.to(d)).float()

    def enable_gradient_checkpointing(self):
        """Run every transformer block and ResBlock under torch.utils.checkpoint (non-reentrant).  The block
        gets a copy of its input: early-2024 blocks add residuals into it in place, which would otherwise
        change the saved input before the recomputation."""
        from torch.utils.checkpoint import checkpoint

        for m in self.unet.modules():
            if type(m).__name__ not in self.BLOCKS or "forward" in m.__dict__:
                continue
            orig = m.forward

            def run(x, *args, _orig=orig, **kwargs):
                return _orig(x.clone(), *args, **kwargs)

            def forward(x, *args, _run=run, **kwargs):
                return checkpoint(_run, x, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            self._patched.append(m)

    def disable_gradient_checkpointing(self):
        for m in self._patched:
            m.__dict__.pop("forward", None)
        self._patched.clear()


class TextUNetCall(UNetCall):
    """ε̂ = diffusion_model(x_t, t, context, y) with context and y recomputed from the captions in each step
    (:class:`text.TextConditioning`), so the text encoders' LoRAs get gradients."""

    def __init__(self, unet, dtype, text):
        super().__init__(unet, dtype)
        self.text = text

    def __call__(self, x_t, t, caption, size):
        context, y = self.text(caption, size, x_t.device)
        return super().__call__(x_t, t, context, y)
