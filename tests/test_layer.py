
import pytest
import torch
import torch.nn as nn

from lora2_train import rank as R
from lora2_train.layer import AdaptiveLoRA


def make(base, r_init=8, r_max=64, block=4):
    layer = AdaptiveLoRA("lora_unet_test", base, r_init=r_init, q=0.9, r_max=r_max, block=block)
    layer.apply_to()
    return layer


def randomize_up(layer):
    with torch.no_grad():
        layer.lora_up.normal_()


def test_zero_delta_at_init_and_shapes_follow_rank():
    base = nn.Linear(32, 48)
    x = torch.randn(5, 32)
    ref = base(x)  # before patching
    layer = make(base, r_init=8)
    assert layer.lora_down.shape == (8, 32) and layer.lora_up.shape == (48, 8)
    assert torch.equal(base(x), ref)  # B = 0 ⇒ ΔW = 0
    assert layer.effective_rank() == 8
    assert float(layer.lam().detach().mean()) == pytest.approx(1.0, abs=1e-6)


def test_forward_equals_reference_formula_linear():
    base = nn.Linear(16, 12)
    layer = make(base, r_init=6, block=1)
    randomize_up(layer)
    x = torch.randn(3, 16)
    lam = R.lam(layer.nu().detach(), 6, scale=6.0)
    expected = x @ base.weight.T + base.bias + x @ layer.lora_down.T @ torch.diag(lam) @ layer.lora_up.T
    assert torch.allclose(base(x), expected, atol=1e-5)
    # ΔW materialized equals the functional difference
    assert torch.allclose(x @ (base.weight + layer.delta_weight()).T + base.bias, expected, atol=1e-5)


def test_forward_equals_reference_formula_conv():
    base = nn.Conv2d(8, 10, 3, padding=1)
    layer = make(base, r_init=4, block=1)
    randomize_up(layer)
    x = torch.randn(2, 8, 6, 6)
    expected = nn.functional.conv2d(x, base.weight + layer.delta_weight(), base.bias, padding=1)
    assert torch.allclose(base(x), expected, atol=1e-4)
    assert layer.lora_up.shape == (10, 4, 1, 1) and layer.lora_down.shape == (4, 8, 3, 3)


def test_restore_gives_base_forward_back():
    base = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    ref = base(x)
    layer = make(base)
    randomize_up(layer)
    assert not torch.allclose(base(x), ref)
    layer.restore()
    assert torch.equal(base(x), ref)


def test_grow_keeps_delta_w_exactly():
    base = nn.Linear(32, 32)
    layer = make(base, r_init=8, block=1)
    randomize_up(layer)
    before = layer.delta_weight()
    assert layer.resize(20)
    assert layer.rank == 20 and layer.lora_up.shape == (32, 20)
    assert torch.all(layer.lora_up[:, 8:] == 0)
    assert torch.allclose(layer.delta_weight(), before, atol=1e-6)


def test_shrink_removes_the_least_important_positions():
    base = nn.Linear(32, 32)
    layer = make(base, r_init=16, block=1)
    randomize_up(layer)
    down, up = layer.folded_factors()
    layer.resize(5)
    expected = up[:, :5] @ down[:5]  # the first 5 positions of the folded factors, unchanged
    assert torch.allclose(layer.delta_weight(), expected, atol=1e-6)
    # Λ is decreasing: dropped positions were the ones with the smallest scale
    lam = R.lam(layer.nu().detach(), 16, scale=16.0)
    assert torch.all(lam[5:] < lam[4])


def test_resize_carries_optimizer_state_for_surviving_positions():
    base = nn.Linear(16, 16)
    layer = make(base, r_init=8, block=1)
    opt = torch.optim.Adam([layer.lora_down, layer.lora_up, layer.rho], lr=1e-2, foreach=False)
    for _ in range(3):
        loss = base(torch.randn(4, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    old_down = layer.lora_down
    m_down = opt.state[old_down]["exp_avg"].clone()
    v_up = opt.state[layer.lora_up]["exp_avg_sq"].clone()
    nu = layer.nu().detach().double()
    ratio = float(torch.expm1(-nu * 12) / torch.expm1(-nu * 8))  # B's kept columns are rescaled by it
    layer.resize(12, opt)
    new_down, new_up = layer.lora_down, layer.lora_up
    assert new_down is not old_down and old_down not in opt.state
    assert any(p is new_down for g in opt.param_groups for p in g["params"])
    st = opt.state[new_down]
    assert torch.equal(st["exp_avg"][:8], m_down) and torch.all(st["exp_avg"][8:] == 0)
    assert torch.allclose(opt.state[new_up]["exp_avg_sq"][:, :8], v_up / ratio ** 2)
    assert torch.all(opt.state[new_up]["exp_avg_sq"][:, 8:] == 0)
    # training continues with the resized parameters, through a graph built before the resize too
    loss = base(torch.randn(4, 16)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    layer.resize(4, opt)
    assert opt.state[layer.lora_down]["exp_avg"].shape == (4, 16)
    loss = base(torch.randn(4, 16)).square().mean()
    loss.backward()
    opt.step()


def test_resize_refuses_non_elementwise_optimizer_state():
    base = nn.Linear(8, 8)
    layer = make(base, r_init=4, block=1)
    opt = torch.optim.Adam([layer.lora_down], lr=1e-3)
    opt.state[layer.lora_down] = {"state1": torch.zeros(7)}
    with pytest.raises(RuntimeError, match="per-element"):
        layer.resize(8, opt)


def test_target_rank_follows_nu_and_blocks():
    layer = make(nn.Linear(128, 128), r_init=8, r_max=100, block=4)
    with torch.no_grad():
        layer.rho.fill_(R.rho_from_nu(R.nu_target(13, 0.9), layer.nu_min))
    assert layer.effective_rank() == 13
    assert layer.target_rank() == 16
    with torch.no_grad():
        layer.rho.fill_(-30.0)  # ν at the floor → r_max
    assert layer.effective_rank() == 100 and layer.target_rank() == 100


def test_r_max_capped_by_layer_shape_and_wrong_type():
    layer = make(nn.Linear(6, 40), r_init=8, r_max=512)
    assert layer.r_max == 6 and layer.rank == 6
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        AdaptiveLoRA("x", nn.LayerNorm(4), 4, 0.9, 8)


def test_nu_gets_gradient_through_lambda():
    base = nn.Linear(8, 8).requires_grad_(False)
    layer = make(base, r_init=4, block=1)
    randomize_up(layer)
    base(torch.randn(3, 8)).square().sum().backward()
    assert layer.rho.grad is not None and layer.rho.grad.abs() > 0
    assert layer.lora_down.grad is not None and layer.lora_up.grad is not None
    assert base.weight.grad is None


def test_set_rank_sets_nu_and_allocation():
    layer = make(nn.Linear(64, 64), r_init=8, r_max=48, block=4)
    for r in (4, 13, 48):
        layer.set_rank(r)
        assert layer.rank == r and layer.effective_rank() == r


def test_initial_and_grown_rows_follow_the_seed_not_the_global_rng():
    def grown(seed, global_seed):
        torch.manual_seed(global_seed)
        base = nn.Linear(16, 24)
        layer = AdaptiveLoRA("lora_unet_x", base, r_init=4, q=0.9, r_max=16, block=1, seed=seed)
        init = layer.lora_down.detach().clone()
        torch.randn(100)  # whatever else the run draws in between
        layer.resize(9)
        return init, layer.lora_down.detach().clone()

    a, b, c = grown(3, 0), grown(3, 123), grown(4, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same seed: identical rows
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1][4:], c[1][4:])  # another seed: others
    assert torch.equal(a[1][:4], a[0])  # growing keeps the old rows
    bound = 1 / 16 ** 0.5
    assert a[1].abs().max() <= bound and a[1][4:].std() > bound / 3  # Kaiming-uniform rows, not zeros
    other = AdaptiveLoRA("lora_unet_y", nn.Linear(16, 24), r_init=4, q=0.9, r_max=16, block=1, seed=3)
    assert not torch.equal(other.lora_down, a[0])  # components draw different rows


def test_resize_rescales_b_moments_with_b():
    base = nn.Linear(16, 16)
    layer = make(base, r_init=8, block=1)
    opt = torch.optim.Adam([layer.lora_down, layer.lora_up, layer.rho], lr=1e-2, foreach=False)
    randomize_up(layer)
    for _ in range(3):
        loss = base(torch.randn(4, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    nu = layer.nu().detach().double()
    ratio = float(torch.expm1(-nu * 5) / torch.expm1(-nu * 8))
    up, st = layer.lora_up.detach().clone(), {k: v.clone() for k, v in opt.state[layer.lora_up].items()}
    m_down = opt.state[layer.lora_down]["exp_avg"].clone()
    layer.resize(5, opt)
    new = opt.state[layer.lora_up]
    assert torch.allclose(layer.lora_up, up[:, :5] * ratio)
    assert torch.allclose(new["exp_avg"], st["exp_avg"][:, :5] / ratio)
    assert torch.allclose(new["exp_avg_sq"], st["exp_avg_sq"][:, :5] / ratio ** 2)
    assert torch.equal(opt.state[layer.lora_down]["exp_avg"], m_down[:5])  # A is not rescaled
    # the gradient of B after the resize is 1/ratio of the one before: check on a fixed input
    x = torch.randn(4, 16)
    layer.resize(8)
    with torch.no_grad():
        layer.lora_up[:, 5:] = 0
    b8 = layer.lora_up
    loss = base(x).square().mean()
    g8 = torch.autograd.grad(loss, b8)[0][:, :5]
    layer.resize(5)
    g5 = torch.autograd.grad(base(x).square().mean(), layer.lora_up)[0]
    assert torch.allclose(g5, g8 / ratio, rtol=1e-4, atol=1e-7)
