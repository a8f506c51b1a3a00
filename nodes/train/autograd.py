"""Autograd through ComfyUI's inference-mode models: usable weights, differentiable attention, copied norm
inputs, Cancel only between steps."""
from __future__ import annotations

import contextlib


def autograd_usable(module):
    """Weights loaded under ComfyUI's inference mode cannot be saved for backward: each such parameter is
    replaced by a normal tensor holding the same bits (one at a time, so memory does not double)."""
    import torch

    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                del p


def restore_flags(flags):
    for p, flag in flags:
        if p.requires_grad != flag:
            p.requires_grad_(flag)


@contextlib.contextmanager
def autograd_attention():
    """ComfyUI's sub-quadratic and split attention (its CPU defaults) work in place and cannot be
    differentiated: use its PyTorch SDPA attention while training, then put the choice back."""
    import comfy.ldm.modules.attention as A

    names = ("optimized_attention", "optimized_attention_masked")
    saved = {n: getattr(A, n) for n in names if hasattr(A, n)}
    in_place = {getattr(A, f, None) for f in ("attention_sub_quad", "attention_split")} - {None}
    sdpa = getattr(A, "attention_pytorch", None)
    try:
        if sdpa is not None:
            for n, f in saved.items():
                if f in in_place:
                    setattr(A, n, sdpa)
        yield
    finally:
        for n, f in saved.items():
            setattr(A, n, f)


@contextlib.contextmanager
def cancel_at_step_boundaries():
    """Cancel stops the embedded training between steps, where the trainer keeps a resumable checkpoint and the
    adapter so far.  Newer ComfyUI (0.21.0) also checks the Cancel flag in every layer call
    (``comfy.ops.run_every_op``), which would end a step half-way with nothing saved; that per-layer check is off
    while the trainer runs (the flag stays set for the trainer's own check) and back on afterwards."""
    try:
        import comfy.ops as ops
    except ImportError:
        ops = None
    check = getattr(ops, "run_every_op", None)
    if check is None:
        yield
        return
    ops.run_every_op = lambda: None
    try:
        yield
    finally:
        ops.run_every_op = check


@contextlib.contextmanager
def norm_inputs_copied(*roots):
    """Early-2024 ComfyUI transformer blocks (U-Net and CLIP layers) add residuals in place (``x += n``) after
    a LayerNorm has saved ``x`` for backward; giving each LayerNorm its own copy of its input keeps autograd
    valid."""
    import torch

    handles = [m.register_forward_pre_hook(lambda _m, args: (args[0].clone(),) + tuple(args[1:]))
               for root in roots for m in root.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
