"""Hyperparameters of LoRA² in one validated dataclass (spec §1–§3)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .lr_schedule import LR_SCHEDULERS

LOSS_TYPES = ("mse", "huber")
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: target groups understood by :mod:`lora2_train.network`
TARGET_GROUPS = ("attn1", "attn2", "ff", "proj", "resnet", "te_attn", "te_mlp")

#: named presets of target groups; "attn" is the paper's choice (spec §4)
TARGET_PRESETS = {
    "attn": ("attn1", "attn2"),
    "attn+ff": ("attn1", "attn2", "ff"),
    "attn+ff+proj": ("attn1", "attn2", "ff", "proj"),
    "all": ("attn1", "attn2", "ff", "proj", "resnet"),
}


#: ρ's learning rate per unit of the LoRA weights' one when ``nu_lr`` is 0.  Adam moves every parameter by
#: about its learning rate per step, so B (zero at the start) needs a time ∝ 1/lr to learn; while it is
#: small ν gets no data gradient through Λ and only L_reg's pull moves it.  ρ stepped at a rate ∝ lr
#: travels the same distance in that time at every lr and step budget (docs/method.md, "Scale-free L_reg").
NU_LR_PER_LR = 25.0


class ConfigError(ValueError):
    """A hyperparameter is invalid; the message names the field."""


@dataclass
class LoRA2Config:
    """LoRA² hyperparameters.

    Rank (spec §1): ``q`` quantile defining D(ν); ``r_init`` rank at step 0;
    ``r_target`` rank that L_reg pulls toward (ν_target = −ln(1−q)/r_target);
    ``r_max`` hard cap (floor ν ≥ −ln(1−q)/r_max); ``r_min`` lowest rank;
    ``rank_block`` ranks are allocated in multiples of this; ``resize_every``
    steps between two re-allocations.

    Loss (spec §3, docs/method.md, "Scale-free L_reg"): L = L_MSE + lambda_r·L_reg + lambda_e·L_entropy with
    L_reg = L_ref·(mean|ln ν − ln ν_aim| + beta·mean(‖A‖²+‖B‖²)/numel), L_ref the mean data loss of
    the run's first steps (:func:`lora2_train.objective.loss_reference`), ν_aim the middle of
    r_target's interval of D(ν) (:func:`lora2_train.rank.nu_aim`).  The defaults are the ones every
    entry point (library, CLI, node, sd-scripts network_args), the demo and the benchmarks use.

    Optimisation: ``optimizer`` (one of :data:`lora2_train.optim.OPTIMIZERS`) with
    ``lr`` for LoRA weights and ``nu_lr`` for the rank parameters ρ (ν = ν_min +
    softplus(ρ)); ``nu_lr`` 0 (the default) means :data:`NU_LR_PER_LR` × ``lr``
    (:meth:`rank_lr`).  ``max_params``: a cap on the LoRA parameters Σ D·(in+out) that
    re-allocation respects, positions allotted by importance across components
    (0: none).

    Training controls (sd-scripts' names; ``steps`` counts optimizer steps):
    ``gradient_accumulation_steps`` micro-batches of ``batch_size`` per optimizer
    step; ``max_grad_norm`` clips the gradient norm of all trained parameters
    (0 = off); ``lr_scheduler`` constant | constant_with_warmup | cosine with
    ``lr_warmup_steps``; ``min_snr_gamma`` min-SNR-γ loss weighting (0 = off);
    ``noise_offset``; ``loss_type`` mse | huber (pseudo-Huber with ``huber_c``);
    ``prediction_type`` epsilon | v_prediction and ``zero_terminal_snr`` of the
    model's noise schedule; ``save_every_n_steps`` adapter snapshots (0 = off);
    ``text_encoder_lr`` learning rate of the text-encoder LoRA weights (targets
    ``te_attn``/``te_mlp``; 0 = ``lr``), in their own optimizer group, scheduled
    like the others.
    """

    q: float = 0.9
    r_init: int = 16
    r_target: int = 1
    r_max: int = 512
    r_min: int = 1
    rank_block: int = 1
    resize_every: int = 10
    lambda_r: float = 0.1
    lambda_e: float = 0.0
    beta: float = 5e3
    scale: float = 1.0
    targets: tuple = TARGET_PRESETS["attn"]
    lr: float = 1e-4
    nu_lr: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "adam"
    steps: int = 500
    batch_size: int = 1
    seed: int = 0
    entropy_queries: int = 256
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    checkpoint_every: int = 100
    max_params: int = 0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    loss_type: str = "mse"
    huber_c: float = 0.1
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    save_every_n_steps: int = 0
    text_encoder_lr: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = resolve_targets(self.targets)
        else:
            self.targets = tuple(self.targets)
        self.validate()

    def rank_lr(self, lr: float | None = None, step_size: bool = True) -> float:
        """ρ's learning rate: ``nu_lr``, or when it is 0, :data:`NU_LR_PER_LR` × the LoRA weights' `lr`
        (``self.lr`` when not given; a host such as sd-scripts passes the one it sets).  ``step_size``
        False: the weights' lr is not a step size but a multiplier of the optimizer's own estimate
        (Prodigy's 1.0), so the default lr :attr:`LoRA2Config.lr` stands in for it."""
        if self.nu_lr > 0:
            return float(self.nu_lr)
        if not step_size:
            return NU_LR_PER_LR * float(LoRA2Config.lr)
        return NU_LR_PER_LR * float(self.lr if lr is None else lr)

    def validate(self) -> "LoRA2Config":
        def bad(name, why):
            raise ConfigError(f"LoRA2Config.{name} {why}, got {getattr(self, name)!r}")

        for name in ("q", "lambda_r", "lambda_e", "beta", "lr", "nu_lr", "weight_decay", "scale", "max_grad_norm",
                     "min_snr_gamma", "noise_offset", "huber_c", "text_encoder_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if not 0.0 < self.q < 1.0:
            bad("q", "must lie in (0, 1)")
        for name in ("r_init", "r_target", "r_max", "r_min", "rank_block", "resize_every", "steps",
                     "batch_size", "entropy_queries", "checkpoint_every", "gradient_accumulation_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        for name in ("lr_warmup_steps", "save_every_n_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be an integer >= 0")
        if self.r_min > self.r_max:
            bad("r_min", f"must not exceed r_max={self.r_max}")
        if not self.r_min <= self.r_init <= self.r_max:
            bad("r_init", f"must lie in [r_min={self.r_min}, r_max={self.r_max}]")
        if not self.r_min <= self.r_target <= self.r_max:
            bad("r_target", f"must lie in [r_min={self.r_min}, r_max={self.r_max}]")
        for name in ("lambda_r", "lambda_e", "beta", "weight_decay", "max_grad_norm", "min_snr_gamma",
                     "noise_offset", "text_encoder_lr", "nu_lr"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("lr", "scale", "huber_c"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0")
        from .optim import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {OPTIMIZERS}")
        if not isinstance(self.max_params, int) or isinstance(self.max_params, bool) or self.max_params < 0:
            bad("max_params", "must be an integer >= 0 (0: no budget)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            bad("mixed_precision", "must be 'no', 'bf16' or 'fp16'")
        if self.lr_scheduler not in LR_SCHEDULERS:
            bad("lr_scheduler", f"must be one of {LR_SCHEDULERS}")
        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"must be one of {LOSS_TYPES}")
        if self.prediction_type not in PREDICTION_TYPES:
            bad("prediction_type", f"must be one of {PREDICTION_TYPES}")
        if not isinstance(self.zero_terminal_snr, bool):
            bad("zero_terminal_snr", "must be true or false")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if unknown or not self.targets:
            bad("targets", f"must be a non-empty subset of {TARGET_GROUPS}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRA2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"LoRA2Config has no field {unknown[0]!r}")
        return cls(**d)


def resolve_targets(spec: str) -> tuple:
    """'attn' / 'attn+ff' / … preset name, or a comma list of groups, to a tuple of groups."""
    if spec in TARGET_PRESETS:
        return TARGET_PRESETS[spec]
    groups = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [g for g in groups if g not in TARGET_GROUPS]
    if unknown or not groups:
        raise ConfigError(
            f"LoRA2Config.targets: unknown target {spec!r}; presets {sorted(TARGET_PRESETS)}, groups {TARGET_GROUPS}")
    return groups
