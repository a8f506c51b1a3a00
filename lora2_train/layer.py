"""The adapted layer of LoRA² (spec §2).

    y = W x + s · B_{:, :D} Λ A_{:D, :} x,     A ∈ R^{D×in}, B ∈ R^{out×D}

A and B are stored at the allocated rank D (not r_max), so memory and FLOPs
follow the effective rank.  When D changes the parameters are
re-allocated and the optimizer's per-parameter state is carried over for
surviving positions (new positions start at zero state).
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import rank as R
from .optim import carry_state


def row_seed(seed: int, name: str, start: int) -> int:
    """Seed of the A rows a component draws from position `start` on: a function of the run's seed,
    the component's name and the position only."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{name}:{start}".encode())) % (2 ** 63)


class AdaptiveLoRA(nn.Module):
    """LoRA² component wrapping one ``nn.Linear`` or ``nn.Conv2d``.

    The wrapped module is not registered as a child (its weights stay the base
    model's); :meth:`apply_to` routes its ``forward`` through this module,
    :meth:`restore` undoes that.  Λ and ν are derived from the scalar ρ:
    ν = ν_min + softplus(ρ), Λ = lam(ν, D, scale=D₀).
    """

    def __init__(self, name: str, base: nn.Module, r_init: int, q: float, r_max: int,
                 r_min: int = 1, block: int = 4, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.kind = "linear"
            in_dim, out_dim = base.in_features, base.out_features
            self.kernel = ()
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"{name}: grouped convolutions cannot carry a LoRA")
            self.kind = "conv"
            in_dim, out_dim = base.in_channels, base.out_channels
            self.kernel = tuple(base.kernel_size)
        else:
            raise TypeError(f"{name}: LoRA² wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        cap = min(in_dim * int(math.prod(self.kernel or (1,))), out_dim)
        self.name = name
        self.in_dim, self.out_dim = in_dim, out_dim
        self.q, self.r_min, self.block = q, r_min, block
        self.r_max = min(r_max, max(cap, r_min))
        self.nu_min = R.nu_floor(self.r_max, q)
        r0 = max(min(r_init, self.r_max), r_min)
        self.multiplier = 1.0
        self.scale = scale
        self.seed = int(seed)
        self._base = [base]  # a list hides it from nn.Module registration
        self._base_forward = None
        # Λ handed over by LoRA2Network before each model call; valid while ρ is unchanged
        # (also during gradient-checkpoint recomputation, which must see the same graph)
        self._lam_cache: torch.Tensor | None = None
        self._lam_version = -1

        self.rho = nn.Parameter(torch.tensor(self._rho_for_rank(r0), dtype=torch.float32))
        self.register_buffer("lam_scale", torch.tensor(float(r0)), persistent=True)
        w = base.weight
        self.lora_down = nn.Parameter(self._init_down(0, r0, w.device))
        self.lora_up = nn.Parameter(torch.zeros(self._up_shape(r0), device=w.device))

    # ---- dtype --------------------------------------------------------------------------------
    #: kept in float32 under any cast of the module (``.to(bf16)``, ``.half()``, sd-scripts' --full_bf16)
    FP32_TENSORS = ("rho", "lam_scale")

    def _apply(self, fn, recurse=True):
        """Casts and moves reach ρ (and Λ's scale) as moves only: they stay float32.  A bf16 ρ near
        −3.4 (rank 64) has a spacing of 2⁻⁶, so Adam steps of 5e-3 round away and ν stops learning."""
        kept = {}
        for name in self.FP32_TENSORS:
            t = self._parameters[name] if name in self._parameters else self._buffers.get(name)
            if t is not None and t.dtype == torch.float32:
                kept[name] = (t, t.detach())  # the float32 values, whatever the cast does to `t`
        super()._apply(fn, recurse)
        for name, (old, value) in kept.items():
            t = self._parameters[name] if name in self._parameters else self._buffers.get(name)
            if t is None or t.dtype == torch.float32:
                continue
            fixed = value.to(device=t.device, dtype=torch.float32)
            if name not in self._parameters:
                self._buffers[name] = fixed
            elif t is old:  # the same Parameter object, as optimizers hold it: swap its data back
                t.data = fixed
            else:
                self._parameters[name] = nn.Parameter(fixed, requires_grad=t.requires_grad)
            p = self._parameters.get(name)
            if p is not None and p.grad is not None and p.grad.dtype != torch.float32:
                p.grad = p.grad.float()
        return self

    # ---- shapes -------------------------------------------------------------------------------
    def _down_shape(self, d):
        return (d, self.in_dim, *self.kernel)

    def _up_shape(self, d):
        return (self.out_dim, d) if self.kind == "linear" else (self.out_dim, d, 1, 1)

    def _init_down(self, start, n, device):
        """Rows start…start+n−1 of A, Kaiming-uniform(a=√5) as standard LoRA: U(−1/√fan_in, 1/√fan_in).

        Drawn on the CPU from a generator seeded by (run seed, component name, start), never from
        the global RNG: the same seed gives the same initial and grown rows in every run and on
        every process of a multi-process run.
        """
        fan_in = self.in_dim * int(math.prod(self.kernel or (1,)))
        bound = 1.0 / math.sqrt(fan_in)
        g = torch.Generator().manual_seed(row_seed(self.seed, self.name, start))
        return torch.empty(self._down_shape(n)).uniform_(-bound, bound, generator=g).to(device)

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def rank(self) -> int:
        """Allocated rank D (rows of A); the number of positions in use."""
        return self.lora_down.shape[0]

    # ---- rank distribution -------------------------------------------------------------------
    def _rho_for_rank(self, r: int) -> float:
        """ρ with D(ν) = r: ν = ν_target(r), or just above the floor when r = r_max."""
        nu = R.nu_target(r, self.q) if r < self.r_max else self.nu_min * (1 + 1e-4)
        return R.rho_from_nu(nu, self.nu_min)

    @torch.no_grad()
    def set_rank(self, r: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set ν so that D(ν) = r and re-allocate at r (used to start from a given ragged layout)."""
        r = int(min(max(r, self.r_min), self.r_max))
        self.rho.fill_(self._rho_for_rank(r))
        self.resize(r, optimizer)

    def nu(self) -> torch.Tensor:
        """ν = ν_min + softplus(ρ)."""
        return R.nu_from_rho(self.rho, self.nu_min)

    def effective_rank(self) -> int:
        """D(ν) = ceil(−ln(1−q)/ν) clamped to [r_min, r_max] (before block rounding)."""
        return R.effective_rank(self.nu(), self.q, self.r_max, self.r_min)

    def target_rank(self) -> int:
        """Rank the parameters should be allocated at now: D(ν) rounded up to the block size."""
        return R.round_rank(self.effective_rank(), self.block, self.r_max)

    def lam(self) -> torch.Tensor:
        """Λ diagonal over the allocated positions (differentiable in ρ)."""
        return R.lam(self.nu(), self.rank, scale=self.lam_scale)

    # ---- forward -----------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · B Λ A x; Λ is folded into B (out×D) which is cheaper than scaling the activations."""
        cached = self._lam_cache
        fresh = cached is not None and self._lam_version == self.rho._version and cached.shape[0] == self.rank
        lam = cached if fresh else self.lam()
        lam = lam.to(self.lora_up.dtype)
        base = self.base
        if self.kind == "linear":
            h = F.linear(x, self.lora_down.to(x.dtype))
            return F.linear(h, (self.lora_up * lam).to(x.dtype))
        h = F.conv2d(x, self.lora_down.to(x.dtype), None, base.stride, base.padding, base.dilation)
        return F.conv2d(h, (self.lora_up * lam[None, :, None, None]).to(x.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self._base_forward(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return y
        return y + (self.multiplier * self.scale) * self.delta(x).to(y.dtype)

    def apply_to(self) -> None:
        """Route the wrapped module's forward through this LoRA (kohya-style monkey patch)."""
        if self._base_forward is None:
            self._base_forward = self.base.forward
            self.base.forward = self.forward

    def restore(self) -> None:
        if self._base_forward is not None:
            self.base.forward = self._base_forward
            self._base_forward = None

    # ---- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def folded_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) with s·Λ folded into up, so ΔW = up @ down with kohya alpha = D (spec §5)."""
        lam = self.lam().detach()
        if self.kind == "linear":
            up = self.lora_up * lam * self.scale
        else:
            up = self.lora_up * lam[None, :, None, None] * self.scale
        return self.lora_down.detach().clone(), up.detach().clone()

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B Λ A in the wrapped module's weight shape."""
        down, up = self.folded_factors()
        if self.kind == "linear":
            return up @ down
        return torch.einsum("od,dikl->oikl", up[:, :, 0, 0], down)

    # ---- grow / shrink -----------------------------------------------------------------------
    @torch.no_grad()
    def resize(self, new_rank: int, optimizer: torch.optim.Optimizer | None = None, in_place: bool = False) -> bool:
        """Re-allocate A and B at `new_rank` positions (spec §2).

        grow: new rows of A get a fresh init and new columns of B are zero;
        shrink: the tail (least important) positions are dropped.  The kept
        columns of B are multiplied by Σ_new/Σ_old (Σ_D = 1 − e^{−νD}, the
        renormalization of Λ), so every surviving position contributes exactly
        what it did before: growing leaves ΔW unchanged.  Optimizer state of
        surviving positions is carried, new positions start at zero state.
        By default new Parameter objects replace the old ones in the module and
        the optimizer's groups; ``in_place=True`` keeps the same Parameter
        objects and swaps their ``.data`` (and the optimizer state tensors) for
        trainers that hold on to the parameters, e.g. sd-scripts, whose
        optimizer, scheduler and gradient clipping are set up once.  In-place
        resizing must happen between steps (after ``optimizer.step()``, before
        the next forward).  Returns True if the rank changed.
        """
        new_rank = int(min(max(new_rank, self.r_min), self.r_max))
        old = self.rank
        if new_rank == old:
            return False
        keep = min(old, new_rank)
        nu = self.nu().detach().double()
        ratio = float(torch.expm1(-nu * new_rank) / torch.expm1(-nu * old))
        dev = self.lora_down.device
        down = self.lora_down.data
        up = self.lora_up.data
        if new_rank > old:
            new_down = torch.cat([down, self._init_down(old, new_rank - old, dev).to(down.dtype)], 0)
            pad = torch.zeros(self._up_shape(new_rank - old), device=dev, dtype=up.dtype)
            new_up = torch.cat([up * ratio, pad], 1)
        else:
            new_down = down[:keep].clone()
            new_up = (up[:, :keep] * ratio).clone()
        self._resize_param("lora_down", new_down, 0, keep, optimizer, in_place)
        # B' = ratio·B and Λ' = Λ/ratio: the gradient of every kept column of B' is 1/ratio of B's,
        # so its Adam moments follow (first ×1/ratio, second ×1/ratio²) and the next step is unchanged
        self._resize_param("lora_up", new_up, 1, keep, optimizer, in_place, grad_scale=1.0 / ratio)
        self._lam_cache = None
        return True

    def _resize_param(self, name: str, new: torch.Tensor, dim: int, keep: int, optimizer,
                      in_place: bool = False, grad_scale: float = 1.0) -> None:
        """Re-allocate one parameter at its new shape, in the module and in the optimizer, carrying state.

        Default: a fresh Parameter (rather than ``p.data = …``) keeps autograd sound while an
        old graph still references the previous one.  ``in_place``: the same Parameter gets the
        new ``.data`` and its gradient is dropped; the optimizer's state tensors are replaced.
        """
        old = getattr(self, name)
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate / wrappers expose .optimizer
        state = opt.state.get(old) if opt is not None else None
        # the parameter's group is needed only for Prodigy's slice_p (a scan over the groups' parameters)
        group = (next((g for g in opt.param_groups if any(p is old for p in g["params"])), None)
                 if state and "p0" in state else None)
        carried = self._carry_state(state, old.shape, new, dim, keep, opt, grad_scale, group) if state else None
        if in_place:
            # set_data keeps the autograd accumulator (and its cached shape) unless the dtype changes;
            # an old graph still alive (the last loss) would hand it to the next forward: pass through
            # another dtype first so the next forward gets a fresh accumulator of the new shape
            old.data = torch.empty(0, dtype=torch.float64 if new.dtype != torch.float64 else torch.float32,
                                   device=new.device)
            old.data = new
            old.grad = None
            param = old
        else:
            param = nn.Parameter(new, requires_grad=old.requires_grad)
            setattr(self, name, param)
        if opt is None:
            return
        if not in_place:
            for group in opt.param_groups:
                group["params"] = [param if p is old else p for p in group["params"]]
            opt.state.pop(old, None)
        if carried is not None:
            state.clear()
            state.update(carried)
            opt.state[param] = state

    def _carry_state(self, state: dict, old_shape, new: torch.Tensor, dim: int, keep: int, opt,
                     grad_scale: float = 1.0, group: dict | None = None) -> dict:
        """Optimizer state at the new shape: surviving positions carried, new positions fresh
        (:func:`lora2_train.optim.carry_state`: per-element moments, bitsandbytes 8-bit blocks,
        Adafactor's factored moments, Prodigy's p0/s).  ``grad_scale``: factor by which the kept
        positions' gradients change with the resize.  A layout that cannot be carried raises one
        line naming the state before anything changes."""
        return carry_state(state, old_shape, new, dim, keep, grad_scale, group, self.name, type(opt).__name__)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.kind} {self.in_dim}->{self.out_dim}, rank={self.rank}, r_max={self.r_max}"
