"""sd-scripts network module: ``--network_module lora2_train.kohya.network`` (spec §2–§5).

sd-scripts' ``train_network.py`` imports this module and calls
:func:`create_network` (or :func:`create_network_from_weights` for
``--dim_from_weights`` / ``--base_weights``), then drives the returned network
through the methods of its network contract (``apply_to``,
``prepare_optimizer_params_with_multiple_te_lrs``, ``prepare_grad_etc``,
``on_epoch_start``, ``get_trainable_params``, ``save_weights`` …).

Arguments:
  ``--network_dim``   r_init, the rank every component starts at (default LoRA2Config.r_init, 16).
  ``--network_alpha`` ignored: LoRA² scales by Λ (spec §1) and saves alpha = rank.
  ``--network_args``  ``key=value`` strings: r_max, r_target, r_min,
                      q, lambda_r, lambda_e, beta, nu_lr (0: 25 × the U-Net lr), resize_every, rank_block,
                      scale, entropy_queries, max_params (a cap on the LoRA parameters, 0: none),
                      targets (a preset of ``config.TARGET_PRESETS`` such as ``attn`` or
                      ``attn+ff``, or a comma list of groups); unset ones take LoRA2Config()'s defaults.

The rows of A a component grows are drawn from a generator seeded by the run's seed, the component's name
and the position (:func:`lora2_train.layer.row_seed`); the run's seed is the one sd-scripts seeds torch
with (``--seed``).  Without ``--seed`` sd-scripts seeds every process with its own random draw, so the
network takes process 0's on every process (when it is built, and again at its first optimizer step); it
is recorded in a saved file's ``lora2_config`` and in the network's state, and ``--network_weights`` /
``--resume`` bring it back, so rows grown after a resume are those of an uninterrupted run.

sd-scripts builds its optimizer once, so re-allocation keeps the Parameter
objects and swaps their data and the optimizer's state in place
(:meth:`AdaptiveLoRA.resize` with ``in_place=True``), every ``resize_every``
optimizer steps, from a post-step hook on the optimizer that holds this
network's parameters.  The optimizers whose state can be carried (AdamW, AdamW8bit,
Lion, Adafactor, Prodigy, …) and the separate Adam that steps ρ under Prodigy and
Adafactor are described in :mod:`lora2_train.optim`; ρ stays float32 under
``--full_bf16`` / ``--full_fp16`` casts of the network.  The extra loss terms λ_r·L_reg + λ_e·L_entropy are
added by the trainer extension :mod:`lora2_train.kohya.train`; with plain
``train_network.py`` this module trains, but ν only feels the diffusion loss.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import rank as R
from ..distributed import check_in_sync, from_main_process
from ..config import TARGET_GROUPS, ConfigError, LoRA2Config
from ..format import (Adapter, AdapterFormatError, LoRAModule, adapter_from_network, adapter_state_dict,
                      atomic_write_bytes, load_adapter, save_adapter)
from ..network import TARGET_PATTERNS, TE_GROUPS, LoRA2Network
from .. import optim as O
from ..naming import TE_PREFIXES, UNET_PREFIX

logger = logging.getLogger(__name__)

#: ``--network_args`` keys and their types (all other LoRA2Config fields belong to sd-scripts' own options)
NETWORK_ARGS = {
    "r_max": int, "r_target": int, "r_min": int, "q": float, "lambda_r": float, "lambda_e": float,
    "beta": float, "nu_lr": float, "resize_every": int, "rank_block": int, "scale": float,
    "entropy_queries": int, "targets": str, "max_params": int,
}
#: keys sd-scripts or other networks' habits may pass that carry no meaning here when unset
_IGNORED_WHEN_UNSET = ("dropout", "rank_dropout", "module_dropout")
#: the LoRA2Config fields an sd-scripts run decides through this network (--network_dim, --network_args, --seed)
#: and the run facts it adds; the others (learning rate, optimizer, batch, schedule, …) are sd-scripts' own
#: arguments, recorded in its ss_* metadata, so a file's lora2_config leaves them out
_OWN_CONFIG = frozenset(NETWORK_ARGS) | {"r_init", "seed", "trainer", "network_module", "steps"}
NETWORK_MODULE_NAME = "lora2_train.kohya.network"

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: target groups recognised from a kohya key (the module-path patterns with '.' → '_')
_KEY_PATTERNS = {g: re.compile(p.replace(r"\.", "_")) for g, p in TARGET_PATTERNS.items()}


def parse_network_args(kwargs: dict) -> dict:
    """``--network_args`` strings → typed LoRA2Config fields; one-line errors naming the key."""
    out = {}
    for key, value in kwargs.items():
        if key in _IGNORED_WHEN_UNSET:
            if value not in (None, "", "None") and float(value) != 0.0:
                raise ConfigError(f"network_args: {key}={value!r} is not supported by LoRA² (leave it unset or 0)")
            continue
        if key not in NETWORK_ARGS:
            raise ConfigError(f"network_args: unknown key {key!r}; LoRA² understands {sorted(NETWORK_ARGS)}")
        kind = NETWORK_ARGS[key]
        if isinstance(value, str) and kind is not str:
            try:
                value = kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
            except ValueError:
                raise ConfigError(f"network_args: {key}={value!r} is not a valid {kind.__name__}") from None
        out[key] = value
    return out


def make_config(network_dim, network_args: dict, base: dict | None = None) -> LoRA2Config:
    """LoRA2Config from sd-scripts' ``--network_dim`` (r_init) and ``--network_args``; every other field
    keeps LoRA2Config's default (the defaults of every entry point).

    ``base``: fields read from a file's ``lora2_config`` (resume); network_args override them.
    """
    fields = dict(base or {})
    if network_dim not in (None, "", 0):
        fields["r_init"] = int(network_dim)
    fields.setdefault("r_init", LoRA2Config.r_init)
    # sd-scripts seeds torch with --seed before it builds the network; without --seed each process draws its
    # own, so the network agrees on process 0's when it is built (KohyaLoRA2Network)
    fields.setdefault("seed", torch.initial_seed() % 2 ** 31)
    fields.update(parse_network_args(network_args))
    fields.setdefault("r_max", max(LoRA2Config.r_max, fields["r_init"], fields.get("r_target", LoRA2Config.r_target)))
    return LoRA2Config(**fields)


def _text_encoders(text_encoder) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [t for t in text_encoder if t is not None]
    return [text_encoder]


class KohyaLoRA2Network(LoRA2Network):
    """LoRA2Network with the sd-scripts network contract (see module docstring).

    The seed of the rows of A (``config.seed``, :func:`lora2_train.layer.row_seed`) is one for all processes
    of a multi-process run: with ``sync_seed`` (the default) the network takes process 0's when it is built
    (sd-scripts has joined the process group by then) and again when it attaches to its optimizer, so
    sd-scripts without ``--seed``, which seeds every process differently, grows the same rows everywhere.
    The seed is kept in the network's state (buffer ``lora2_seed``: ``--save_state`` / ``--resume``) and in
    a saved file's ``lora2_config``, and loading either restores it."""

    def __init__(self, config: LoRA2Config, unet: nn.Module | None, text_encoders=(), multiplier: float = 1.0,
                 sync_seed: bool = True):
        tes = _text_encoders(text_encoders)
        if any(g in TE_GROUPS for g in config.targets) and len(tes) == 1:
            raise ConfigError("network_args: targets with te_attn/te_mlp need SDXL's two text encoders "
                              "(keys lora_te1_/lora_te2_); this model has one")
        if sync_seed:
            config = dataclasses.replace(config, seed=from_main_process(config.seed))
        super().__init__(config, unet, tes)
        self.multiplier = float(multiplier)
        self.set_multiplier(multiplier)
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        # the optimizer step count, saved with the network's state (sd-scripts --save_state / --resume), so a
        # resumed run re-allocates at the same steps as an uninterrupted one
        self.register_buffer("lora2_steps", torch.zeros((), dtype=torch.int64), persistent=True)
        # the row seed of A, saved with the network's state: rows grown after a resume are those of an
        # uninterrupted run
        self.register_buffer("lora2_seed", torch.tensor(int(config.seed), dtype=torch.int64), persistent=True)
        #: the run's last optimizer step (sd-scripts' max_train_steps): no re-allocation after it
        self.final_step: int | None = None
        #: called as fn(step, resized) after every optimizer step (resized: {key: (old, new)})
        self.step_listeners: list[Callable[[int, dict], None]] = []
        #: called as fn(path, ranks) after every save
        self.save_listeners: list[Callable[[str, dict], None]] = []
        self._global_hook = None
        #: sd-scripts' optimizer family (set by prepare_network); under Prodigy/Adafactor ρ is stepped by
        #: rank_optimizer, a plain Adam at nu_lr, after each step of sd-scripts' optimizer (lora2_train.optim)
        self.optimizer_family = "adamw"
        self.rank_optimizer: torch.optim.Optimizer | None = None
        #: accelerate's GradScaler under fp16 (set by the trainer extension): ρ's gradients are unscaled by it
        self.grad_scaler = None
        self._frozen: list[nn.Parameter] = []
        self._lam_vectorized = True
        self._register_load_state_dict_pre_hook(self._before_load, with_module=True)
        self.register_load_state_dict_post_hook(self._after_load)

    # ---- sd-scripts: application -------------------------------------------------------------
    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        """Patch the target modules; components of a part sd-scripts does not train are dropped."""
        if not apply_text_encoder:
            self._drop(TE_PREFIXES)
        if not apply_unet:
            self._drop((UNET_PREFIX,))
        if not len(self.layers):
            raise ConfigError("LoRA² has no component left to train: the targets cover only the parts "
                              "sd-scripts is told not to train (--network_train_unet_only / _text_encoder_only)")
        super().apply_to()
        if not self._lam_vectorized:
            self._remove_lam_hooks()
        return self

    def _drop(self, prefixes) -> None:
        for key in [k for k in self.layers if k.startswith(tuple(prefixes))]:
            self.layers[key].restore()
            del self.layers[key]

    def enable_gradient_checkpointing(self) -> None:
        """sd-scripts checkpoints with ``use_reentrant=True``: a recomputed block must not reuse Λ
        computed outside it (its graph would be freed by the first block's backward), so every
        component computes its own Λ (:meth:`AdaptiveLoRA.lam`) instead of the vectorized cache."""
        self._lam_vectorized = False
        self._remove_lam_hooks()

    def _remove_lam_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.clear_lam()

    def set_multiplier(self, multiplier) -> None:
        self.multiplier = float(multiplier)
        super().set_multiplier(multiplier)

    # ---- the row seed of A ---------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return int(self.config.seed)

    def set_seed(self, seed: int) -> None:
        """Draw the rows of A grown from now on from `seed` (every component; recorded in saved files)."""
        seed = int(seed)
        if seed != self.config.seed:
            self.config = dataclasses.replace(self.config, seed=seed)
        for layer in self.layers.values():
            layer.seed = seed
        self.lora2_seed.fill_(seed)

    def agree_seed(self) -> int:
        """Take process 0's seed on every process (one broadcast; nothing in a single process)."""
        seed = from_main_process(self.seed)
        if seed != self.seed:
            logger.info("LoRA²: row seed %d of process 0 replaces this process's %d", seed, self.seed)
        self.set_seed(seed)
        return seed

    def set_enabled(self, is_enabled: bool) -> None:
        for layer in self.layers.values():
            layer.multiplier = self.multiplier if is_enabled else 0.0

    def prepare_network(self, args) -> None:
        """Called by sd-scripts with its parsed arguments before the optimizer groups are asked for:
        note the optimizer (one whose state LoRA² cannot carry is refused here, in one line)."""
        try:
            self.optimizer_family = O.check_sd_scripts_optimizer(O.sd_scripts_optimizer_type(args))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def prepare_grad_etc(self, text_encoder, unet) -> None:
        self.requires_grad_(True)
        for p in getattr(self, "_frozen", ()):
            p.requires_grad_(False)

    def on_epoch_start(self, text_encoder, unet) -> None:
        self.train()

    def on_step_start(self, text_encoder, unet) -> None:
        """Called before each step; re-allocation happens after optimizer steps (see :meth:`watch_optimizer`)."""

    def get_trainable_params(self):
        """What sd-scripts clips; ρ stepped by the network's own Adam is left out (under fp16 its gradient
        is still loss-scaled at clipping time, and Adam's step does not depend on its norm)."""
        own = {id(p) for p in self.rank_parameters()} if self.rank_optimizer is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    # ---- sd-scripts: optimizer ----------------------------------------------------------------
    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr=None):
        """Optimizer groups: U-Net weights at unet_lr, each text encoder's at its text_encoder_lr
        (a list: one per encoder, or one for both), the rank parameters ρ at ``nu_lr`` (0: NU_LR_PER_LR × unet_lr,
        :meth:`LoRA2Config.rank_lr`) without weight decay.  A group whose learning rate is 0 is frozen and left out (as sd-scripts does).
        Returns (groups, descriptions) for sd-scripts' learning-rate logging."""
        if isinstance(text_encoder_lr, (list, tuple)):
            te_lrs = list(text_encoder_lr) or [None]
        else:
            te_lrs = [text_encoder_lr]
        self.requires_grad_(True)
        self._frozen = []
        groups, descriptions = [], []

        def add(params, lr, description, **extra):
            if not params:
                return
            lr = default_lr if lr is None else lr
            if lr is not None and float(lr) == 0.0:
                for p in params:
                    p.requires_grad_(False)
                self._frozen.extend(params)
                return
            group = {"params": params, **extra}
            if lr is not None:
                group["lr"] = float(lr)
            groups.append(group)
            descriptions.append(description)

        def weights(prefix):
            return [p for k, l in self.layers.items() if k.startswith(prefix) for p in (l.lora_down, l.lora_up)]

        for i, prefix in enumerate(TE_PREFIXES):
            add(weights(prefix), te_lrs[min(i, len(te_lrs) - 1)], f"textencoder {i + 1}")
        add(weights(UNET_PREFIX), unet_lr, "unet")
        weight_lr = default_lr if unet_lr is None else unet_lr
        if O.needs_rank_optimizer(self.optimizer_family):
            # Prodigy takes one learning rate for all groups, Adafactor's relative step none: ρ keeps its
            # rate through its own Adam, stepped after each step of sd-scripts' optimizer
            nu_lr = self.config.rank_lr(step_size=False)
            self.rank_optimizer = torch.optim.Adam(self.rank_parameters(), lr=nu_lr)
        else:
            self.rank_optimizer = None
            nu_lr = self.config.rank_lr(None if weight_lr is None else float(weight_lr))
            add(self.rank_parameters(), nu_lr, "nu", weight_decay=0.0)
        self.watch_optimizer()
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)

    def watch_optimizer(self) -> None:
        """Find the optimizer that will hold these parameters at its first step (sd-scripts builds it
        and may wrap it in accelerate's AcceleratedOptimizer), then re-allocate after its steps."""
        if self._global_hook is None:
            self._global_hook = register_optimizer_step_post_hook(self._on_any_step)

    def _on_any_step(self, optimizer, args, kwargs) -> None:
        if self.optimizer is None:
            mine = {id(p) for p in self.parameters()}
            if not any(id(p) in mine for g in optimizer.param_groups for p in g["params"]):
                return
            self.attach_optimizer(optimizer)
        if optimizer is self.optimizer:
            self.after_optimizer_step()

    def attach_optimizer(self, optimizer) -> None:
        """Use `optimizer` (or the one it wraps) for in-place re-allocation; a state layout that cannot be
        carried (:func:`lora2_train.optim.check_state`) is refused here, at the first step."""
        optimizer = getattr(optimizer, "optimizer", optimizer)
        for layer in self.layers.values():
            for p in (layer.lora_down, layer.lora_up):
                state = optimizer.state.get(p)
                if state:
                    group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
                    O.check_state(state, p.shape, layer.name, type(optimizer).__name__, group)
        self.optimizer = optimizer
        # every process takes its first step here: agree on the row seed once more (for a process group
        # joined after the network was built; resumed state and loaded files are the same everywhere)
        self.agree_seed()

    def after_optimizer_step(self) -> dict:
        """Count the step; every ``resize_every`` steps re-allocate at D(ν) in place; tell listeners.

        In a multi-process run every process checks first that all of them are about to allocate the
        same ranks from the same row seeds and hold the same ν and weights (:func:`distributed.check_in_sync`,
        one all-reduce)."""
        self.steps += 1
        if self.rank_optimizer is not None:
            self._step_rank_optimizer()
        self.lora2_steps.fill_(self.steps)
        resized = {}
        if self.steps % self.config.resize_every == 0 and (self.final_step is None or self.steps < self.final_step):
            targets = self.target_ranks()
            check_in_sync(self, self.steps, targets)
            resized = self.resize(self.optimizer, in_place=True, targets=targets)
        for fn in list(self.step_listeners):
            fn(self.steps, resized)
        return resized

    def _step_rank_optimizer(self) -> None:
        """ρ's own Adam step: its gradients unscaled by the fp16 loss scale; skipped when not finite."""
        params = [p for p in self.rank_parameters() if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            torch._foreach_mul_(grads, 1.0 / float(scaler.get_scale()))
        if bool(torch.isfinite(torch.stack([g.reshape(()) for g in grads]).float()).all()):  # one device sync
            self.rank_optimizer.step()
        self.rank_optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Stop watching optimizers and give the wrapped modules their forward back."""
        if self._global_hook is not None:
            self._global_hook.remove()
            self._global_hook = None
        self.restore()

    # ---- regularization of weight norms (sd-scripts --scale_weight_norms) ----------------------
    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        """Max-norm regularization of ΔW = s·BΛA: where ‖ΔW‖_F > max_norm, A and B are scaled by
        √(max_norm/‖ΔW‖).  Returns (keys scaled, mean norm, max norm) after scaling."""
        norms, scaled = [], 0
        for layer in self.layers.values():
            norm = float(layer.delta_weight().norm())
            ratio = min(1.0, max_norm_value / norm) if norm > 0 else 1.0
            if ratio < 1.0:
                scaled += 1
                layer.lora_down.mul_(ratio ** 0.5)
                layer.lora_up.mul_(ratio ** 0.5)
            norms.append(norm * ratio)
        return scaled, sum(norms) / len(norms), max(norms)

    # ---- save / load ---------------------------------------------------------------------------
    def save_weights(self, file, dtype=None, metadata=None):
        """Write the adapter in the LoRA² file format (spec §5; :func:`format.adapter_from_network`).

        The file holds the components at their current allocation, exactly the adapter that gave
        the last loss (no re-allocation here: it would drop trained positions; the last one
        happened at the last multiple of ``resize_every``).  ``lora2_config`` holds the fields this network
        decides (``_OWN_CONFIG``; the training settings are in sd-scripts' ``ss_*`` keys, not as the library's
        defaults).  sd-scripts' metadata is kept; the LoRA² keys (and
        ``ss_network_module = networks.lora``, ``ss_network_dim`` = the largest rank) take
        precedence, because the file is a standard kohya LoRA with ragged ranks.  ``dtype``: a
        torch dtype or None (float32).  ``.safetensors`` files are written atomically; other
        extensions get a torch-pickled state dict.
        """
        meta = {str(k): str(v) for k, v in (metadata or {}).items() if v is not None}
        extra = {"trainer": "sd-scripts", "network_module": NETWORK_MODULE_NAME, "steps": self.steps}
        adapter = adapter_from_network(self, self.config, meta.get("ss_base_model_version", "sdxl_base_v1-0"), extra)
        meta.update(adapter.metadata)
        meta["lora2_config"] = json.dumps({k: v for k, v in json.loads(meta["lora2_config"]).items()
                                           if k in _OWN_CONFIG})
        meta["lora2_network_module"] = NETWORK_MODULE_NAME
        dtype_name = _DTYPE_NAMES.get(dtype, "fp32") if not isinstance(dtype, str) else dtype
        meta["lora2_dtype"] = dtype_name
        adapter = Adapter(adapter.modules, meta)
        path = Path(file)
        if path.suffix.lower() == ".safetensors":
            _add_sd_scripts_hashes(adapter_state_dict(adapter, dtype_name), meta)
            save_adapter(adapter, path, dtype=dtype_name, overwrite=True)
        else:
            buf = io.BytesIO()
            torch.save(adapter_state_dict(adapter, dtype_name), buf)
            atomic_write_bytes(path, buf.getvalue(), overwrite=True)
        for fn in list(self.save_listeners):
            fn(str(path), self.ranks())
        return path

    def load_weights(self, file) -> str:
        """Load a LoRA² (or plain kohya LoRA) file into this network, ranks re-allocated per component
        (resume / ``--network_weights``).  Returns a one-line summary (sd-scripts prints it)."""
        adapter = _read_adapter(file)
        return self.load_adapter(adapter, str(file))

    @torch.no_grad()
    def load_adapter(self, adapter: Adapter, where: str = "adapter") -> str:
        """Set every component from ``adapter``: rank D from the file, ν from ``lora2_nu`` (or the ν
        whose D(ν) = D for a plain LoRA), A = down and B = up·(alpha/D)/(s·Λ), so ΔW is unchanged.
        A LoRA² file's row seed (``lora2_config``) replaces the network's, so training on from it grows
        the rows the run that wrote it would have grown."""
        nus = _json_meta(adapter.metadata, "lora2_nu", where)
        seed = _file_seed(adapter.metadata, where)
        if seed is not None:
            if seed != self.seed:
                logger.info("LoRA²: row seed %d from %s replaces %d", seed, where, self.seed)
            self.set_seed(seed)
        unexpected = sorted(k for k in adapter.modules if k not in self.layers)
        missing = sorted(k for k in self.layers if k not in adapter.modules)
        for key, module in adapter.modules.items():
            if key in self.layers:
                _load_component(self.layers[key], module, nus.get(key), where, self.optimizer)
        summary = f"{len(adapter.modules) - len(unexpected)} LoRA² components loaded"
        if missing:
            summary += f"; {len(missing)} kept at their initial weights (first: {missing[0]})"
        if unexpected:
            summary += f"; {len(unexpected)} file modules not in this model (first: {unexpected[0]})"
        return summary

    @staticmethod
    def _before_load(self, state_dict, prefix, *rest) -> None:
        """Load-state pre-hook, for state saved at other (ragged) ranks.  sd-scripts' ``--resume``
        restores the network through accelerate's ``load_state`` (network state, then optimizer state,
        then the rest); with several processes the network is wrapped (keys ``module.…``), so this runs
        as a hook of the network module whatever the entry point.  Every component is first
        re-allocated in place at the saved rank (same Parameter objects, which the optimizer holds), so
        the optimizer state loaded next fits."""
        for key, layer in self.layers.items():
            saved = state_dict.get(f"{prefix}layers.{key}.lora_down")
            if saved is not None and saved.shape[0] != layer.rank:
                layer.resize(int(saved.shape[0]), self.optimizer, in_place=True)
        if f"{prefix}lora2_steps" not in state_dict:  # state saved before the step count was kept
            state_dict[f"{prefix}lora2_steps"] = self.lora2_steps.clone()
        if f"{prefix}lora2_seed" not in state_dict:  # state saved before the seed was kept
            state_dict[f"{prefix}lora2_seed"] = self.lora2_seed.clone()

    @staticmethod
    def _after_load(self, incompatible) -> None:
        self.steps = int(self.lora2_steps)
        self.set_seed(int(self.lora2_seed))

    # ---- sd-scripts --base_weights ---------------------------------------------------------------
    def is_mergeable(self) -> bool:
        return True

    @torch.no_grad()
    def merge_to(self, text_encoder, unet, weights_sd, dtype, device) -> None:
        """Add multiplier·ΔW of every module of ``weights_sd`` to the base weights (``--base_weights``)."""
        modules = _modules_from_state_dict(weights_sd, "weights")
        for key, module in modules.items():
            if key not in self.layers:
                continue
            base = self.layers[key].base
            delta = module.delta_weight().reshape(base.weight.shape)
            w = base.weight
            w.copy_((w.to(device, torch.float32) + self.multiplier * delta.to(device)).to(w.device, w.dtype))
        logger.info("LoRA² weights merged: %d modules", sum(k in self.layers for k in modules))


# ---- module-level helpers ------------------------------------------------------------------------
def _add_sd_scripts_hashes(state_dict, meta: dict) -> None:
    """The ``sshs_*`` hashes sd-scripts precomputes for indexers, when sd-scripts is importable."""
    try:
        from library import train_util  # sd-scripts' package, on sys.path when run under sd-scripts
        fn = train_util.precalculate_safetensors_hashes
    except Exception:
        return
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = fn(state_dict, meta)


def _json_meta(meta: dict, key: str, where: str) -> dict:
    if key not in meta:
        return {}
    try:
        value = json.loads(meta[key])
    except ValueError:
        raise AdapterFormatError(f"{where}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{where}: metadata {key!r} is not a JSON object")
    return value


def _file_seed(meta: dict, where: str) -> int | None:
    """The row seed a LoRA² file's ``lora2_config`` records (None: a plain LoRA, or no seed recorded)."""
    seed = _json_meta(meta, "lora2_config", where).get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise AdapterFormatError(f"{where}: lora2_config seed {seed!r} is not an integer >= 0")
    return seed


def _modules_from_state_dict(sd: dict, where: str) -> dict[str, LoRAModule]:
    """kohya keys ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` → LoRAModule per name."""
    names = sorted({k.split(".", 1)[0] for k in sd if ".lora_down." in k or ".lora_up." in k})
    out = {}
    for name in names:
        down, up = sd.get(f"{name}.lora_down.weight"), sd.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise AdapterFormatError(f"{where}: key {name!r} lacks lora_down/lora_up weights")
        alpha = sd.get(f"{name}.alpha")
        out[name] = LoRAModule(down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    return out


def _read_adapter(file) -> Adapter:
    path = Path(file)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    if path.suffix.lower() == ".safetensors":
        return load_adapter(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return Adapter(_modules_from_state_dict(sd, str(path)), {})


def _load_component(layer, module: LoRAModule, nu, where: str, optimizer=None) -> None:
    d = module.rank
    if d > layer.r_max:
        raise ConfigError(f"{where}: {layer.name} has rank {d} above r_max={layer.r_max}; "
                          f"pass network_args r_max={d} or more")
    expect_down = (d, layer.in_dim, *layer.kernel)
    if tuple(module.down.shape) != expect_down or module.up.shape[0] != layer.out_dim:
        raise AdapterFormatError(f"{where}: {layer.name}: lora_down {tuple(module.down.shape)} / lora_up "
                                 f"{tuple(module.up.shape)} do not fit the model's {layer.in_dim}->{layer.out_dim}")
    if nu is not None and float(nu) > layer.nu_min:
        layer.rho.fill_(R.rho_from_nu(float(nu), layer.nu_min))
    else:
        layer.rho.fill_(layer._rho_for_rank(d))
    layer.resize(d, optimizer, in_place=True)
    lam = layer.lam().detach()
    up = module.up.float().to(lam.device) * (module.alpha / d) / (layer.scale * lam.view(1, -1, *([1] * (module.up.dim() - 2))))
    layer.lora_down.data.copy_(module.down.float())
    layer.lora_up.data.copy_(up.reshape(layer.lora_up.shape))
    layer._lam_cache = None


def _groups_of_keys(keys) -> tuple:
    """Target groups of kohya keys (the module-path patterns of network.TARGET_PATTERNS)."""
    groups = []
    for key in keys:
        found = [g for g, pat in _KEY_PATTERNS.items() if pat.search(key)]
        if not found:
            raise AdapterFormatError(f"module {key!r} is not in any LoRA² target group {TARGET_GROUPS}")
        groups.extend(g for g in found if g not in groups)
    return tuple(g for g in TARGET_GROUPS if g in groups)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """sd-scripts entry point: a new LoRA² network; ``network_dim`` is r_init (the starting rank of
    every component), ``network_alpha`` is ignored (alpha = rank), ``kwargs`` are ``--network_args``."""
    if neuron_dropout not in (None, 0, 0.0):
        raise ConfigError(f"--network_dropout={neuron_dropout} is not supported by LoRA²")
    config = make_config(network_dim, kwargs)
    if network_alpha not in (None, 1, 1.0, config.r_init, float(config.r_init)):
        logger.info("LoRA²: --network_alpha=%s is ignored (Λ scales each component; files store alpha = rank)",
                    network_alpha)
    net = KohyaLoRA2Network(config, unet, text_encoder, multiplier)
    logger.info("LoRA²: %d components, r_init=%d r_target=%d r_max=%d q=%s targets=%s",
                len(net.layers), config.r_init, config.r_target, config.r_max, config.q, "+".join(config.targets))
    return net


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """sd-scripts entry point: a network shaped by a file (ragged ranks), for ``--dim_from_weights``
    and ``--base_weights``.  The LoRA² hyperparameters come from the file's ``lora2_config``,
    overridden by ``kwargs`` (``--network_args``).  Returns (network, weights_sd)."""
    where = str(file) if file is not None else "weights"
    if weights_sd is None:
        adapter = _read_adapter(file)
        weights_sd = adapter_state_dict(adapter, "fp32")
    else:
        meta = {}
        if file is not None and str(file).lower().endswith(".safetensors") and os.path.exists(file):
            meta = load_adapter(file).metadata
        adapter = Adapter(_modules_from_state_dict(weights_sd, where), meta)
    if not adapter.modules:
        raise AdapterFormatError(f"{where}: no LoRA module (no '<name>.lora_down.weight' key)")
    saved = _json_meta(adapter.metadata, "lora2_config", where)
    known = {"q", "r_init", "r_target", "r_max", "r_min", "rank_block", "resize_every", "lambda_r", "lambda_e",
             "beta", "scale", "nu_lr", "entropy_queries"}
    base = {k: v for k, v in saved.items() if k in known}
    if _file_seed(adapter.metadata, where) is not None:  # the rows grown from here on: those of the file's run
        base["seed"] = _file_seed(adapter.metadata, where)
    max_rank = max(adapter.ranks().values())
    base.setdefault("r_init", max_rank)
    base["r_max"] = max(int(base.get("r_max", max_rank)), max_rank)
    base["targets"] = _groups_of_keys(adapter.modules)
    config = make_config(None, kwargs, base)
    # build at the smallest rank, then shape every component from the file
    small = LoRA2Config(**{**config.to_dict(), "r_init": config.r_min, "r_target": config.r_target})
    net = KohyaLoRA2Network(small, unet, text_encoder, multiplier, sync_seed=not for_inference)
    net.config = dataclasses.replace(config, seed=net.seed)
    net.nu_aim = R.nu_aim(config.r_target, config.q)
    absent = sorted(k for k in adapter.modules if k not in net.layers)
    if absent:
        raise AdapterFormatError(f"{where}: module {absent[0]!r} has no counterpart in this model "
                                 f"(a LoRA for another base model?)")
    for key in [k for k in net.layers if k not in adapter.modules]:
        del net.layers[key]
    for layer in net.layers.values():
        layer.lam_scale.fill_(float(min(max(config.r_init, layer.r_min), layer.r_max)))
    logger.info("LoRA² from %s: %s", where, net.load_adapter(adapter, where))
    return net, weights_sd
