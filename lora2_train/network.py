"""Injection of LoRA² components into a UNet and text encoders (spec §4).

A :class:`LoRA2Network` finds the target ``nn.Linear`` / ``nn.Conv2d``
modules by path patterns, wraps each in an :class:`AdaptiveLoRA` named by its
kohya key, and exposes what a trainer needs: parameter groups (LoRA weights,
rank parameters ρ), per-component ranks and ν, re-allocation, L_reg.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from . import naming
from . import rank as R
from .config import LoRA2Config
from .layer import AdaptiveLoRA

#: path patterns of each target group; both ldm and diffusers spellings
TARGET_PATTERNS = {
    "attn1": r"\.attn1\.(to_q|to_k|to_v|to_out\.0)$",
    "attn2": r"\.attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "ff": r"\.ff\.net\.(0\.proj|2)$",
    "proj": r"\.(proj_in|proj_out)$",
    "resnet": r"(\.(in_layers\.2|out_layers\.3|skip_connection)|\.resnets\.\d+\.(conv1|conv2|conv_shortcut))$",
    "te_attn": r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
    "te_mlp": r"mlp\.(fc1|fc2)$",
}
UNET_GROUPS = ("attn1", "attn2", "ff", "proj", "resnet")
TE_GROUPS = ("te_attn", "te_mlp")


def target_pattern(groups: Iterable[str]) -> re.Pattern:
    """One regex matching '.' + module path for any of the target groups."""
    return re.compile("|".join(f"(?:{TARGET_PATTERNS[g]})" for g in groups))


class LoRA2Network(nn.Module):
    """All LoRA² components of one model, keyed by kohya name."""

    def __init__(self, config: LoRA2Config, unet: nn.Module | None = None,
                 text_encoders: Sequence[nn.Module] = ()):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict()
        self.nu_aim = R.nu_aim(config.r_target, config.q)
        # L_ref of the objective (sum and count of the first data losses, objective.loss_reference)
        self.register_buffer("loss_ref", torch.zeros(2), persistent=True)
        self._register_load_state_dict_pre_hook(_keep_loss_ref)
        self._roots: list[nn.Module] = []
        self._hooks: list = []
        if unet is not None:
            self._inject(unet, naming.UNET_PREFIX, [g for g in config.targets if g in UNET_GROUPS])
        te_groups = [g for g in config.targets if g in TE_GROUPS]
        if te_groups:
            for i, te in enumerate(text_encoders):
                self._inject(te, naming.TE_PREFIXES[i], te_groups)
        if not len(self.layers):
            raise ValueError(f"no module of the model matches targets {list(config.targets)}")
        if config.max_params:
            floor = sum(self._floor_units(l) * l.block * self._position_cost(l) for l in self.layers.values())
            if config.max_params < floor:
                from .config import ConfigError
                raise ConfigError(f"LoRA2Config.max_params {config.max_params} is below {floor}, the size of the "
                                  f"smallest allocation (one rank block per component)")
            if self.num_parameters() > config.max_params:
                self.resize()

    # ---- construction ------------------------------------------------------------------------
    def _inject(self, root: nn.Module, prefix: str, groups: Iterable[str]) -> None:
        groups = list(groups)
        if not groups:
            return
        self._roots.append(root)
        pattern = target_pattern(groups)
        translate = _path_translator(root) if prefix == naming.UNET_PREFIX else naming.text_encoder_path
        c = self.config
        for path, module in root.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or not pattern.search("." + path):
                continue
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                continue
            key = naming.kohya_key(translate(path), prefix)
            if key in self.layers:
                raise ValueError(f"two modules map to the same kohya key {key!r}")
            self.layers[key] = AdaptiveLoRA(key, module, c.r_init, c.q, c.r_max, c.r_min, c.rank_block, c.scale,
                                            c.seed)

    def apply_to(self) -> "LoRA2Network":
        """Patch every wrapped module; around each call of a model root, Λ of all components is
        computed once, vectorized (:meth:`refresh_lam`), instead of once per component."""
        for layer in self.layers.values():
            layer.apply_to()
        if not self._hooks:
            for root in self._roots:
                self._hooks.append(root.register_forward_pre_hook(lambda *_: self.refresh_lam()))
        return self

    def restore(self) -> None:
        """Give every wrapped module its own forward back (the base model is untouched)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.clear_lam()
        for layer in self.layers.values():
            layer.restore()

    def nu_vector(self) -> torch.Tensor:
        """ν of every component, in layer order: ν = ν_min + softplus(ρ)."""
        layers = list(self.layers.values())
        rho = torch.stack([l.rho for l in layers])
        nu_min = torch.tensor([l.nu_min for l in layers], dtype=rho.dtype, device=rho.device)
        return R.nu_from_rho(rho, nu_min)

    def refresh_lam(self) -> None:
        """Compute Λ of all components in one vectorized pass and hand each layer its slice."""
        layers = list(self.layers.values())
        ranks = [l.rank for l in layers]
        scale = torch.stack([l.lam_scale for l in layers])
        flat = R.lam_ragged(self.nu_vector(), ranks, scale)
        for layer, lam in zip(layers, torch.split(flat, ranks)):
            layer._lam_cache = lam
            layer._lam_version = layer.rho._version

    def clear_lam(self) -> None:
        for layer in self.layers.values():
            layer._lam_cache = None

    def set_multiplier(self, multiplier: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = float(multiplier)

    # ---- parameters --------------------------------------------------------------------------
    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for l in self.layers.values() for p in (l.lora_down, l.lora_up)]

    def rank_parameters(self) -> list[nn.Parameter]:
        return [l.rho for l in self.layers.values()]

    def param_groups(self, lr: float | None = None, nu_lr: float | None = None,
                     text_encoder_lr: float | None = None) -> list[dict]:
        """Optimizer groups: the U-Net's LoRA weights at `lr` ("lora"), the text encoders' at
        `text_encoder_lr` ("lora_te"; config ``text_encoder_lr``, 0 meaning `lr`), rank parameters ρ at
        `nu_lr` ("nu", no weight decay; by default ``config.rank_lr(lr)``).  A weight group without parameters is left out."""
        c = self.config
        lr = c.lr if lr is None else lr
        te_lr = c.text_encoder_lr if text_encoder_lr is None else text_encoder_lr
        unet, te = [], []
        for key, l in self.layers.items():
            (te if key.startswith(naming.TE_PREFIXES) else unet).extend((l.lora_down, l.lora_up))
        groups = [{"params": unet, "lr": lr, "name": "lora"}]
        if te:
            groups.append({"params": te, "lr": te_lr or lr, "name": "lora_te"})
        groups = [g for g in groups if g["params"]]
        if nu_lr is None:
            nu_lr = c.rank_lr(lr, step_size=c.optimizer != "prodigy")
        groups.append({"params": self.rank_parameters(), "lr": nu_lr,
                       "weight_decay": 0.0, "name": "nu"})
        return groups

    def num_parameters(self) -> int:
        """LoRA parameters as saved: Σ_ℓ D_ℓ·(in_ℓ·k_ℓ + out_ℓ)."""
        return sum(l.lora_down.numel() + l.lora_up.numel() for l in self.layers.values())

    # ---- ranks -------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        return {k: l.rank for k, l in self.layers.items()}

    def nus(self) -> dict[str, float]:
        return {k: float(l.nu().detach()) for k, l in self.layers.items()}

    def target_ranks(self) -> dict[str, int]:
        """The rank every component would be re-allocated at now: D(ν) rounded up to the block, within
        ``config.max_params`` (:meth:`budget_ranks`)."""
        return self.budget_ranks({k: layer.target_rank() for k, layer in self.layers.items()})

    @torch.no_grad()
    def resize(self, optimizer: torch.optim.Optimizer | None = None, in_place: bool = False,
               targets: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
        """Re-allocate every component at its current D(ν) (rounded to the block), or at ``targets``
        (from :meth:`target_ranks`); returns changes.

        ``in_place`` keeps the Parameter objects (see :meth:`AdaptiveLoRA.resize`)."""
        targets = self.target_ranks() if targets is None else targets
        changed = {}
        # shrink first, then grow: the parameters in memory never exceed the larger of both allocations
        for k in sorted(targets, key=lambda k: targets[k] - self.layers[k].rank):
            layer = self.layers[k]
            old, new = layer.rank, targets[k]
            if layer.resize(new, optimizer, in_place=in_place):
                changed[k] = (old, new)
        return {k: changed[k] for k in self.layers if k in changed}

    @staticmethod
    def _position_cost(layer: AdaptiveLoRA) -> int:
        """Parameters of one rank position: a row of A and a column of B."""
        return layer.in_dim * int(torch.Size(layer.kernel or (1,)).numel()) + layer.out_dim

    @staticmethod
    def _floor_units(layer: AdaptiveLoRA) -> int:
        return max(1, -(-layer.r_min // layer.block))

    @torch.no_grad()
    def budget_ranks(self, targets: dict[str, int]) -> dict[str, int]:
        """`targets` (ranks at D(ν)) cut to ``config.max_params`` parameters when they exceed it: rank
        blocks are allotted by importance across components, the block of positions k+1…k+b of a
        component scored by its f-mass Σ f(·;ν) = e^{−νk} − e^{−ν(k+b)}, lowest dropped first (the
        allotment of the load-time ``--params`` budget, :func:`lora2_train.tools.truncate.allot`)."""
        budget = self.config.max_params
        layers = self.layers
        if not budget or sum(t * self._position_cost(layers[k]) for k, t in targets.items()) <= budget:
            return targets
        from .tools.truncate import allot

        scores, cost, floor = {}, {}, {}
        for k, t in targets.items():
            layer = layers[k]
            b = layer.block
            nu = float(layer.nu().detach())
            starts = range(0, t, b)
            scores[k] = [math.exp(-nu * a) - math.exp(-nu * min(a + b, t)) for a in starts]
            cost[k] = b * self._position_cost(layer)
            floor[k] = min(self._floor_units(layer), len(starts))
        units = allot(scores, cost, budget, floor)
        return {k: min(units[k] * layers[k].block, t) for k, t in targets.items()}

    # ---- regularizer -------------------------------------------------------------------------
    def reg_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L_reg parts (spec §3, docs/method.md, "Scale-free L_reg"):

            rank term    mean_ℓ |ln ν_ℓ − ln ν_aim|   (ν_aim: the middle of r_target's interval of D(ν))
            weight term  mean_ℓ (‖A_ℓ‖² + ‖B_ℓ‖²) / numel_ℓ

        The rank term is measured in log-rank: its pull on ν is a fixed share per octave of rank, the
        same whether r_target is 1 or 512.  The weight term is a per-element mean, so one β means the
        same at every width.  :func:`lora2_train.objective.lora2_loss` multiplies both by the detached
        data loss, which makes λ_r and β independent of the loss's scale."""
        layers = list(self.layers.values())
        rank_term = (self.nu_vector().log() - math.log(self.nu_aim)).abs().mean()
        params = [p for l in layers for p in (l.lora_down, l.lora_up)]
        sq = torch.stack(torch._foreach_norm(params)).square().view(-1, 2).sum(1)
        numel = torch.tensor([l.lora_down.numel() + l.lora_up.numel() for l in layers], dtype=sq.dtype,
                             device=sq.device)
        return rank_term, (sq / numel).mean()

    # ---- checkpoint state --------------------------------------------------------------------
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict` whose ranks may differ from the current allocation."""
        missing = [k for k in self.layers if f"layers.{k}.lora_down" not in state]
        if missing:
            raise KeyError(f"checkpoint lacks LoRA² component {missing[0]!r}")
        for k, layer in self.layers.items():
            layer.resize(state[f"layers.{k}.lora_down"].shape[0])
        self.load_state_dict(state, strict=True)


def _keep_loss_ref(state_dict, prefix, *rest) -> None:
    """A state saved before L_ref was kept has no ``loss_ref``: it is measured again from the next steps."""
    state_dict.setdefault(f"{prefix}loss_ref", torch.zeros(2))


def _path_translator(root: nn.Module):
    """Identity for ldm UNets; diffusers → ldm path translation for diffusers UNets."""
    children = dict(root.named_children())
    if "down_blocks" not in children:
        return lambda p: p
    n = len(children["down_blocks"][0].resnets)
    up_attn = {i: hasattr(b, "attentions") for i, b in enumerate(children["up_blocks"])}
    return lambda p: naming.diffusers_to_ldm(p, n, up_attn)
