"""Optimizers for LoRA² and their state across re-allocation (spec §2), shared by both trainers.

:func:`build_optimizer` builds the embedded trainer's optimizer by name (``adam``, ``adamw``,
``adamw8bit``, ``adafactor``, ``prodigy``, ``lion``; each optional package imported only when asked
for).  sd-scripts builds its own optimizer; :func:`check_sd_scripts_optimizer` tells at start whether
LoRA² can carry its state, and whether ρ must be stepped by a separate Adam (see below).

:func:`carry_state` is the state surgery of a re-allocation: a parameter's rank axis grows (new A
rows, new B columns) or loses its tail; the optimizer state of every surviving position is kept,
new positions start fresh.  Per optimizer:

- torch Adam/AdamW/SGD, lion-pytorch Lion, prodigyopt's moments: per-element tensors, sliced or
  zero-padded along the rank axis;
- bitsandbytes 8-bit (``state1``/``state2`` uint8 codes with block-wise ``absmax`` and a ``qmap``):
  dequantized, sliced/padded, re-quantized with the same code and block size (kept positions move
  between blocks, so they are equal within one quantization step of their new block);
- Adafactor's factored second moment (``exp_avg_sq_row`` = mean over the last axis,
  ``exp_avg_sq_col`` = mean over the second-last): the rank-1 estimate V̂ = row·col/mean(row) it
  stands for is rebuilt, sliced/padded like a per-element moment and factored again (exact for the
  kept positions, since V̂ stays rank-1); non-factored ``exp_avg_sq`` is per-element;
- Prodigy's ``s`` (gradient sums) and ``p0`` (the parameter at its first step), flat and strided by
  ``slice_p``: kept positions keep both, new positions get s = 0 and p0 = their new value (what
  Prodigy sets for a fresh parameter); the global ``d`` and its sums are untouched.

``grad_scale``: factor by which the kept positions' gradients change with the re-allocation (B's kept
columns are rescaled by Λ's renormalization): first-moment state ×s, second-moment ×s², parameter
copies (Prodigy's p0) ×1/s, normalized updates (Adafactor's exp_avg) unchanged.

The rank parameters ρ have their own learning rate (``nu_lr``).  Prodigy accepts only one learning
rate for all groups and would fold ρ's gradients (a different scale: the rank regularizer) into its
global step size d; Adafactor with a relative step ignores learning rates and with parameter scaling
multiplies the step by |ρ|.  Under these two, ρ is stepped by a plain Adam at ``nu_lr``
(:class:`WithRankOptimizer` here, the network's own in the sd-scripts backend), so ν learns at the
same rate under every optimizer.
"""
from __future__ import annotations

import importlib
import logging
import math

import torch

logger = logging.getLogger(__name__)

#: names understood by :func:`build_optimizer` (and ``LoRA2Config.optimizer``)
OPTIMIZERS = ("adam", "adamw", "adamw8bit", "adafactor", "prodigy", "lion")
#: optimizers under which ρ is stepped by its own Adam at nu_lr
SEPARATE_RANK_OPTIMIZER = ("adafactor", "prodigy")
#: optional packages: optimizer name → (import name, pip name)
PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "adafactor": ("transformers", "transformers"),
            "prodigy": ("prodigyopt", "prodigyopt"), "lion": ("lion_pytorch", "lion-pytorch")}
#: our names → sd-scripts ``--optimizer_type``
SD_SCRIPTS_NAMES = {"adam": "torch.optim.Adam", "adamw": "AdamW", "adamw8bit": "AdamW8bit",
                    "adafactor": "Adafactor", "prodigy": "Prodigy", "lion": "Lion"}
#: sd-scripts ``--optimizer_type`` values (lower case) whose state LoRA² carries → our family name
SD_SCRIPTS_SUPPORTED = {
    "adamw": "adamw", "torch.optim.adamw": "adamw", "torch.optim.adam": "adam", "pagedadamw": "adamw",
    "pagedadamw32bit": "adamw", "sgdnesterov": "sgd", "torch.optim.sgd": "sgd",
    "adamw8bit": "adamw8bit", "pagedadamw8bit": "adamw8bit", "bitsandbytes.optim.adamw8bit": "adamw8bit",
    "lion8bit": "adamw8bit", "pagedlion8bit": "adamw8bit", "sgdnesterov8bit": "adamw8bit",
    "lion": "lion", "lion_pytorch.lion": "lion",
    "adafactor": "adafactor", "transformers.optimization.adafactor": "adafactor",
    "prodigy": "prodigy", "prodigyopt.prodigy": "prodigy",
}
_BNB_BLOCKSIZES = (256, 2048, 4096, 64, 128, 512, 1024)


class OptimizerUnavailable(ImportError):
    """The optional package an optimizer needs is not installed; the message names it."""


def _package(name: str):
    module, pip = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptimizerUnavailable(f"optimizer {name!r} needs the package {pip}: pip install {pip}") from None


# ---- building (embedded trainer) -------------------------------------------------------------------
def build_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float = 0.0, **kwargs):
    """The optimizer `name` over `param_groups` (dicts with ``params`` and optionally ``lr``,
    ``weight_decay``, ``name``); the group named ``nu`` holds the rank parameters ρ.  ``weight_decay``
    applies to groups that set none.  Under Prodigy and Adafactor the ρ groups go to a plain Adam
    (:class:`WithRankOptimizer`).  ``kwargs`` go to the optimizer's constructor."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    groups = [dict(g) for g in param_groups]
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
    rank_groups = [g for g in groups if g.get("name") == "nu"] if name in SEPARATE_RANK_OPTIMIZER else []
    main_groups = [g for g in groups if not any(g is r for r in rank_groups)]
    if name in ("adam", "adamw"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        # foreach: one fused call per group instead of a Python loop over ~1,700 small tensors
        return cls(groups, lr=lr, foreach=True, **kwargs)
    module = _package(name)
    if name == "adamw8bit":
        main = module.optim.AdamW8bit(main_groups, lr=lr, **kwargs)
    elif name == "lion":
        main = module.Lion(main_groups, lr=lr, **kwargs)
    elif name == "adafactor":
        # a fixed learning rate, as for the other optimizers (no relative step, no parameter scaling)
        options = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **kwargs}
        main = module.optimization.Adafactor(main_groups, lr=lr, **options)
    else:
        if lr < 0.1:
            logger.warning("Prodigy: lr=%g multiplies its own step-size estimate; 1.0 is the usual value", lr)
        main = module.Prodigy(main_groups, lr=lr, **kwargs)
    if not rank_groups:
        return main
    return WithRankOptimizer(main, torch.optim.Adam(rank_groups, lr=rank_groups[0].get("lr", lr)))


class WithRankOptimizer:
    """A main optimizer for the LoRA weights and a plain Adam for the rank parameters ρ, used as one
    (``step``, ``zero_grad``, ``param_groups``, ``state``, ``state_dict``; works with GradScaler).

    ``state`` is the main optimizer's: re-allocation never touches ρ."""

    def __init__(self, main: torch.optim.Optimizer, rank: torch.optim.Optimizer):
        self.main, self.rank = main, rank

    @property
    def param_groups(self) -> list[dict]:
        return self.main.param_groups + self.rank.param_groups

    @property
    def state(self):
        return self.main.state

    @property
    def defaults(self):
        return self.main.defaults

    def step(self, closure=None):
        loss = self.main.step(closure)
        self.rank.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main.zero_grad(set_to_none=set_to_none)
        self.rank.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "rank": self.rank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"main", "rank"}:
            raise ValueError("optimizer state: expected the main and the rank optimizer's state "
                             "(saved with another optimizer?)")
        self.main.load_state_dict(state["main"])
        self.rank.load_state_dict(state["rank"])

    def __repr__(self) -> str:
        return f"WithRankOptimizer(main={type(self.main).__name__}, rank=Adam)"


# ---- sd-scripts -------------------------------------------------------------------------------------
def sd_scripts_optimizer_type(args) -> str:
    """sd-scripts' effective ``--optimizer_type`` (its own defaults: AdamW; --use_8bit_adam, --use_lion_optimizer)."""
    if getattr(args, "use_8bit_adam", False):
        return "AdamW8bit"
    if getattr(args, "use_lion_optimizer", False):
        return "Lion"
    return getattr(args, "optimizer_type", None) or "AdamW"


def check_sd_scripts_optimizer(optimizer_type: str) -> str:
    """Our family name of an sd-scripts optimizer whose state LoRA² carries; else one-line ValueError."""
    family = SD_SCRIPTS_SUPPORTED.get((optimizer_type or "AdamW").lower())
    if family is None:
        alt = ("Prodigy" if optimizer_type.lower().startswith("dadapt") else
               "AdamW" if "schedulefree" in optimizer_type.lower() else "AdamW, AdamW8bit, Lion, Adafactor or Prodigy")
        raise ValueError(f"--optimizer_type {optimizer_type}: LoRA² re-allocates ranks during training and cannot "
                         f"carry this optimizer's state; use {alt}")
    return family


def needs_rank_optimizer(family: str) -> bool:
    return family in SEPARATE_RANK_OPTIMIZER


# ---- state surgery -----------------------------------------------------------------------------------
class StateError(RuntimeError):
    """Optimizer state whose layout LoRA² cannot carry across re-allocation."""


def _refuse(who, opt_name, key, v, why):
    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
    raise StateError(f"{who}: optimizer {opt_name} keeps state {key!r} ({shape}, "
                     f"{getattr(v, 'dtype', '')}) {why}; LoRA² can only resize per-element state "
                     f"(AdamW, AdamW8bit, Lion, Adafactor, Prodigy): use one of those")


def _kind(state: dict, shape: torch.Size) -> str:
    if isinstance(state.get("state1"), torch.Tensor) and state["state1"].dtype == torch.uint8:
        return "bnb8"
    if "exp_avg_sq_row" in state or "RMS" in state:
        return "adafactor"
    if "p0" in state and "s" in state:
        return "prodigy"
    return "elementwise"


def check_state(state: dict, shape, who: str = "parameter", opt_name: str = "optimizer", group=None) -> None:
    """Raise :class:`StateError` (one line) if :func:`carry_state` could not carry `state`."""
    shape = torch.Size(shape)
    kind = _kind(state, shape)
    numel = math.prod(shape)
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        if kind == "bnb8" and k in ("state1", "state2"):
            if v.shape != shape:
                _refuse(who, opt_name, k, v, "of another shape than its parameter")
            if v.dtype != torch.uint8:
                _refuse(who, opt_name, k, v, "mixing 8-bit and 32-bit state")
            i = k[-1]
            if f"qmap{i}" not in state or f"absmax{i}" not in state:
                _refuse(who, opt_name, k, v, f"without qmap{i}/absmax{i} (not a block-wise 8-bit layout)")
            _bnb_blocksize(numel, state[f"absmax{i}"].numel(), who, opt_name, k)
        elif k == "unorm_vec" or (kind == "bnb8" and k[:-1] in ("qmap", "absmax")):
            continue
        elif kind == "adafactor" and k in ("exp_avg_sq_row", "exp_avg_sq_col"):
            if "exp_avg_sq_row" not in state or "exp_avg_sq_col" not in state or len(shape) < 2:
                _refuse(who, opt_name, k, v, "without its other factor")
            want = shape[:-1] if k.endswith("row") else shape[:-2] + shape[-1:]
            if v.shape != want:
                _refuse(who, opt_name, k, v, f"not of the factored shape {tuple(want)}")
        elif kind == "prodigy" and k in ("s", "p0"):
            sp = int((group or {}).get("slice_p", 1))
            if v.shape != (len(range(0, numel, sp)),):
                _refuse(who, opt_name, k, v, f"not the flat slice_p={sp} layout of {tuple(shape)}")
        elif v.shape != shape:
            _refuse(who, opt_name, k, v, "that is not per-element")
        elif not v.is_floating_point():
            _refuse(who, opt_name, k, v, "quantized in an unknown layout")


def _moved(v: torch.Tensor, shape, dim: int, keep: int, scale: float = 1.0,
           fresh: torch.Tensor | None = None) -> torch.Tensor:
    """`v` at the new shape along `dim`: the first `keep` positions copied (×scale), the rest `fresh` (zero)."""
    out = torch.zeros(shape, dtype=v.dtype, device=v.device) if fresh is None else fresh.to(v.dtype).clone()
    kept = v.narrow(dim, 0, keep)
    out.narrow(dim, 0, keep).copy_(kept * scale if scale != 1.0 else kept)
    return out


def _bnb_blocksize(numel: int, blocks: int, who="parameter", opt_name="optimizer", key="absmax") -> int:
    for bs in _BNB_BLOCKSIZES:
        if -(-numel // bs) == blocks:
            return bs
    raise StateError(f"{who}: optimizer {opt_name} keeps {blocks} absmax blocks for {numel} values "
                     f"({key}); no known block size fits: use AdamW")


def _carry_bnb8(state, i: int, shape, new_shape, dim, keep, scale) -> dict:
    import bitsandbytes.functional as BF

    q, absmax, code = state[f"state{i}"], state[f"absmax{i}"], state[f"qmap{i}"]
    bs = _bnb_blocksize(q.numel(), absmax.numel())
    full = BF.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=bs).float().view(shape)
    moved = _moved(full, new_shape, dim, keep, scale).contiguous()
    nq, qs = BF.quantize_blockwise(moved, code=code, blocksize=bs)
    return {f"state{i}": nq.view(new_shape), f"absmax{i}": qs.absmax.to(absmax.dtype)}


def _carry_flat(v, shape, new_shape, dim, keep, slice_p, scale, fresh):
    """Prodigy's flat, strided (every slice_p-th element) state: kept positions that were sampled keep
    their value (×scale), every other sampled position takes `fresh` (full new shape)."""
    n = math.prod(shape)
    full = torch.zeros(n, dtype=v.dtype, device=v.device)
    seen = torch.zeros(n, dtype=torch.bool, device=v.device)
    full[::slice_p] = v
    seen[::slice_p] = True
    full, seen = full.view(shape), seen.view(shape)
    out = fresh.to(v.dtype).clone()
    region = out.narrow(dim, 0, keep)
    region.copy_(torch.where(seen.narrow(dim, 0, keep), full.narrow(dim, 0, keep) * scale, region))
    return out.flatten()[::slice_p].clone()


@torch.no_grad()
def carry_state(state: dict, old_shape, new: torch.Tensor, dim: int, keep: int, grad_scale: float = 1.0,
                group: dict | None = None, who: str = "parameter", opt_name: str = "optimizer") -> dict:
    """Optimizer state of one parameter re-allocated from `old_shape` to ``new.shape`` along `dim`
    (the first `keep` positions survive; `new` is the parameter's new value).  See the module docstring."""
    shape, new_shape = torch.Size(old_shape), new.shape
    check_state(state, shape, who, opt_name, group)
    kind = _kind(state, shape)
    out = {}
    for k, v in state.items():
        if k in out:
            continue
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            out[k] = v
        elif kind == "bnb8" and k in ("state1", "state2"):
            out.update(_carry_bnb8(state, int(k[-1]), shape, new_shape, dim, keep, grad_scale ** int(k[-1])))
        elif k == "unorm_vec" or (kind == "bnb8" and k[:-1] in ("qmap", "absmax")):
            out.setdefault(k, v)
        elif kind == "adafactor" and k in ("exp_avg_sq_row", "exp_avg_sq_col"):
            row, col = state["exp_avg_sq_row"].float(), state["exp_avg_sq_col"].float()
            mean = row.mean(-1, keepdim=True)
            v_hat = torch.where(mean > 0, row / mean.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
            v_hat = v_hat.unsqueeze(-1) * col.unsqueeze(-2)
            v_new = _moved(v_hat, new_shape, dim, keep, grad_scale ** 2)
            out["exp_avg_sq_row"] = v_new.mean(-1).to(state["exp_avg_sq_row"].dtype)
            out["exp_avg_sq_col"] = v_new.mean(-2).to(state["exp_avg_sq_col"].dtype)
        elif kind == "prodigy" and k in ("s", "p0"):
            sp = int((group or {}).get("slice_p", 1))
            if k == "s":
                out[k] = _carry_flat(v, shape, new_shape, dim, keep, sp, grad_scale,
                                     torch.zeros(new_shape, dtype=v.dtype, device=v.device))
            else:
                out[k] = _carry_flat(v, shape, new_shape, dim, keep, sp, 1.0 / grad_scale, new.detach())
        else:
            if kind == "adafactor" and k == "exp_avg":
                moment = 0  # an average of normalized updates: invariant to the gradient's scale
            elif k in ("exp_avg", "momentum_buffer", "state1"):
                moment = 1
            elif k.endswith("_sq") or k == "state2":
                moment = 2
            else:
                moment = 0
            out[k] = _moved(v, new_shape, dim, keep, grad_scale ** moment)
    if kind == "prodigy" and state["p0"].dim() == 0:
        p0 = state["p0"]
        # Prodigy keeps a scalar 0 for a parameter that was all zero at its first step (B): still
        # exact if every new position starts at that value too; otherwise expand it
        fresh = new.detach().narrow(dim, keep, new_shape[dim] - keep) if new_shape[dim] > keep else None
        if fresh is not None and bool((fresh != p0).any()):
            sp = int((group or {}).get("slice_p", 1))
            out["p0"] = _carry_flat(p0.expand(math.prod(shape))[::sp].clone(), shape, new_shape, dim, keep, sp,
                                    1.0 / grad_scale, new.detach())
    return out
