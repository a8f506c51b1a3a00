import math

import pytest
import torch

from lora2_train import rank


def test_nu_target_hand_value():
    # q = 0.9: −ln(0.1) = 2.302585…; / 64
    assert rank.nu_target(64, 0.9) == pytest.approx(2.302585092994046 / 64, rel=1e-12)


@pytest.mark.parametrize("r", [1, 2, 7, 64, 100, 512])
def test_effective_rank_of_target_is_target(r):
    assert rank.effective_rank(rank.nu_target(r, 0.9), 0.9, r_max=512) == r


def test_effective_rank_hand_values_and_clamp():
    # ν = 0.1, q = 0.9: 23.0258… → 24
    assert rank.effective_rank(0.1, 0.9, r_max=512) == 24
    # q = 0.5: ln 2 / 0.1 = 6.93 → 7
    assert rank.effective_rank(0.1, 0.5, r_max=512) == 7
    assert rank.effective_rank(1e-6, 0.9, r_max=128) == 128
    assert rank.effective_rank(50.0, 0.9, r_max=128, r_min=2) == 2


def test_effective_rank_rejects_bad_nu_and_q():
    with pytest.raises(ValueError, match="nu"):
        rank.effective_rank(0.0, 0.9, r_max=8)
    with pytest.raises(ValueError, match="q"):
        rank.effective_rank(0.1, 1.0, r_max=8)


def test_pmf_hand_values_sum_and_monotone():
    nu = torch.tensor(0.5, dtype=torch.float64)
    f = rank.pmf(torch.arange(1, 6), nu)
    expected = [math.exp(-0.5 * (k - 1)) - math.exp(-0.5 * k) for k in range(1, 6)]
    assert torch.allclose(f, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert torch.all(f[1:] < f[:-1])
    # the full distribution sums to one; the first D(ν) positions hold ≥ q of the mass
    full = rank.pmf(torch.arange(1, 2000), nu).sum()
    assert float(full) == pytest.approx(1.0, abs=1e-12)
    D = rank.effective_rank(nu, 0.9, r_max=10_000)
    assert float(rank.pmf(torch.arange(1, D + 1), nu).sum()) >= 0.9
    assert float(rank.pmf(torch.arange(1, D), nu).sum()) < 0.9


def test_lam_renormalized_and_scaled():
    nu = torch.tensor(0.2, dtype=torch.float64)
    L = rank.lam(nu, 10)
    assert float(L.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.all(L[1:] < L[:-1])
    # ratio of neighbours is e^{-ν}
    assert torch.allclose(L[1:] / L[:-1], torch.full((9,), math.exp(-0.2), dtype=torch.float64))
    # scale = D gives mean entry 1
    assert float(rank.lam(nu, 10, scale=10.0).mean()) == pytest.approx(1.0, abs=1e-12)
    # hand value of the first entry: (1 − e^{−ν}) / (1 − e^{−10ν})
    assert float(L[0]) == pytest.approx((1 - math.exp(-0.2)) / (1 - math.exp(-2.0)), rel=1e-12)


def test_softplus_floor_and_inverse():
    nu_min = rank.nu_floor(512, 0.9)
    rho = torch.tensor([-50.0, 0.0, 3.0], dtype=torch.float64)
    nu = rank.nu_from_rho(rho, nu_min)
    assert torch.all(nu >= nu_min)
    for v in (nu_min * 1.5, 0.03, 2.0):
        r = rank.rho_from_nu(v, nu_min)
        assert float(rank.nu_from_rho(torch.tensor(r, dtype=torch.float64), nu_min)) == pytest.approx(v, rel=1e-9)
    with pytest.raises(ValueError):
        rank.rho_from_nu(nu_min, nu_min)


def test_gradient_wrt_nu_sign_when_tail_helps():
    """If the target needs the tail positions, lowering ν (flatter Λ) lowers the loss: dL/dν > 0."""
    torch.manual_seed(0)
    D = 8
    nu = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    comps = torch.eye(D, dtype=torch.float64)
    target = torch.ones(D, dtype=torch.float64)  # every position matters equally
    out = (rank.lam(nu, D, scale=D)[:, None] * comps).sum(0)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    assert nu.grad is not None and float(nu.grad) > 0
    # and when only the head matters, the gradient points the other way (sharper Λ helps)
    nu2 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    target2 = torch.zeros(D, dtype=torch.float64)
    target2[0] = 3.0
    out2 = (rank.lam(nu2, D, scale=D)[:, None] * comps).sum(0)
    ((out2 - target2) ** 2).sum().backward()
    assert float(nu2.grad) < 0


def test_round_rank():
    assert rank.round_rank(5, 4, 512) == 8
    assert rank.round_rank(8, 4, 512) == 8
    assert rank.round_rank(511, 4, 10) == 10
    assert rank.round_rank(3, 1, 512) == 3


def test_lam_ragged_equals_per_component_lam():
    nu = torch.tensor([0.05, 0.3, 1.2], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([8.0, 3.0, 1.0], dtype=torch.float64)
    ranks = [8, 3, 1]
    flat = rank.lam_ragged(nu, ranks, scale)
    parts = torch.split(flat, ranks)
    for i, r in enumerate(ranks):
        assert torch.allclose(parts[i], rank.lam(nu[i], r, scale=scale[i]), rtol=1e-12)
    flat.sum().backward()
    assert nu.grad is not None
