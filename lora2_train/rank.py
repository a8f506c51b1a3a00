"""Per-component rank distribution of LoRA² (spec §1).

Every LoRA component ℓ owns a rate ν_ℓ > 0 of a discretized exponential
distribution over rank positions k = 1, 2, …; low positions are the most
important ones.  All functions here are pure and work on floats or tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: slack used when rounding D(ν) up, so that D(ν_target(r)) == r despite float error
_CEIL_EPS = 1e-6


def _as_tensor(nu) -> torch.Tensor:
    return nu if isinstance(nu, torch.Tensor) else torch.tensor(float(nu), dtype=torch.float64)


def quantile_mass(q: float) -> float:
    """−ln(1 − q): the ν·D product at which the exponential reaches quantile q."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must lie in (0, 1), got {q!r}")
    return -math.log1p(-q)


def pmf(k, nu) -> torch.Tensor:
    """Discretized exponential  f(k; ν) = exp(−ν(k−1)) − exp(−νk) = exp(−ν(k−1))·(1 − exp(−ν)).

    Computed as exp(−ν(k−1))·(−expm1(−ν)) so small ν loses no precision.
    `k` may be an int or a tensor of positions (1-based).
    """
    nu = _as_tensor(nu)
    k = k if isinstance(k, torch.Tensor) else torch.as_tensor(k, dtype=nu.dtype)
    k = k.to(nu.dtype)
    return torch.exp(-nu * (k - 1)) * (-torch.expm1(-nu))


def nu_target(r_target: float, q: float) -> float:
    """ν_target = −ln(1 − q) / r_target  (paper), so that D(ν_target) = r_target."""
    if r_target <= 0:
        raise ValueError(f"r_target must be positive, got {r_target!r}")
    return quantile_mass(q) / r_target


def nu_aim(r_target: float, q: float) -> float:
    """The rate L_reg's rank term pulls ν toward: −ln(1 − q) / (r_target − ½).

    ν_target(r) = −ln(1−q)/r is the lower edge of the interval of rates with D(ν) = r (D = ceil(−ln(1−q)/ν)),
    so a component held there by the pull would flip between ranks r and r + 1 with the noise of every
    step; aiming at the middle of that interval (continuous rank r − ½) settles it at r.  Our choice
    (docs/method.md, "Scale-free L_reg"); D(nu_aim(r)) == r for every r ≥ 1.
    """
    if r_target < 1:
        raise ValueError(f"r_target must be at least 1, got {r_target!r}")
    return quantile_mass(q) / (r_target - 0.5)


def nu_floor(r_max: int, q: float) -> float:
    """Smallest admissible rate ν_min = −ln(1 − q) / r_max: D(ν) never exceeds r_max."""
    return nu_target(r_max, q)


def effective_rank(nu, q: float, r_max: int, r_min: int = 1) -> int:
    """D(ν) = ceil(−ln(1 − q) / ν), clamped to [r_min, r_max]  (spec §1, our choice: ceil).

    The quantile-q position of the exponential: the first D positions carry at
    least a fraction q of the mass.  D carries no gradient.
    """
    nu = float(nu.detach()) if isinstance(nu, torch.Tensor) else float(nu)
    if not nu > 0.0 or not math.isfinite(nu):
        raise ValueError(f"nu must be a positive finite rate, got {nu!r}")
    d = math.ceil(quantile_mass(q) / nu - _CEIL_EPS)
    return int(min(max(d, r_min), r_max))


def lam(nu, D: int, scale: float = 1.0) -> torch.Tensor:
    """Λ = diag(f(1;ν) … f(D;ν)) renormalized over the truncated support, times `scale`.

        Λ_k = scale · f(k;ν) / Σ_{j≤D} f(j;ν)
            = scale · exp(−ν(k−1))·(1 − e^{−ν}) / (1 − e^{−νD})

    Returns the diagonal as a 1-D tensor of length D; differentiable in ν.
    With scale = D₀ (the rank at initialization) the mean entry is 1 at init
    (spec §1, our choice), so learning rates keep their usual LoRA meaning.
    """
    if D < 1:
        raise ValueError(f"D must be >= 1, got {D}")
    nu = _as_tensor(nu)
    k = torch.arange(1, D + 1, dtype=nu.dtype, device=nu.device)
    f = pmf(k, nu)
    total = -torch.expm1(-nu * D)  # Σ_{k≤D} f(k;ν) = 1 − e^{−νD}
    return scale * f / total


def lam_ragged(nu: torch.Tensor, ranks: list[int], scale: torch.Tensor) -> torch.Tensor:
    """Λ of many components at once, concatenated: [Λ_1(ν_1, D_1), …, Λ_L(ν_L, D_L)] (length Σ D_ℓ).

    Same equation as :func:`lam`, evaluated in a handful of vector operations
    instead of a dozen per component:
        Λ_{ℓ,k} = scale_ℓ · exp(−ν_ℓ(k−1))·(1 − e^{−ν_ℓ}) / (1 − e^{−ν_ℓ D_ℓ}),  k = 1…D_ℓ
    Split the result with ``torch.split(out, ranks)``.
    """
    d = torch.as_tensor(ranks, device=nu.device)
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=nu.device), d)
    starts = torch.cumsum(d, 0) - d
    k0 = torch.arange(int(d.sum()), device=nu.device) - starts[owner]  # k − 1
    per = scale * (-torch.expm1(-nu)) / (-torch.expm1(-nu * d.to(nu.dtype)))
    return per[owner] * torch.exp(-nu[owner] * k0.to(nu.dtype))


def nu_from_rho(rho: torch.Tensor, nu_min: float) -> torch.Tensor:
    """ν = ν_min + softplus(ρ): positive, never below the r_max floor, smooth in ρ (spec §1)."""
    return nu_min + F.softplus(rho)


def rho_from_nu(nu: float, nu_min: float) -> float:
    """Inverse of :func:`nu_from_rho`:  ρ = ln(exp(ν − ν_min) − 1)."""
    x = nu - nu_min
    if x <= 0:
        raise ValueError(f"nu={nu!r} must exceed the floor nu_min={nu_min!r}")
    return x + math.log(-math.expm1(-x))  # stable softplus⁻¹


def round_rank(D: int, block: int, r_max: int) -> int:
    """Allocated rank: D rounded up to a multiple of `block`, at most r_max (spec §2)."""
    if block <= 1:
        return int(min(D, r_max))
    return int(min(block * math.ceil(D / block), r_max))
