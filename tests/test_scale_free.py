"""The scale-free L_reg (docs/method.md, "Scale-free L_reg"): hand values, L_ref's life cycle, and the invariances
it is built for — the same ranks when the loss is scaled, close ranks when the model is widened."""
import math
import statistics

import pytest
import torch

from lora2_train import rank as R
from lora2_train.config import LoRA2Config
from lora2_train.network import LoRA2Network
from lora2_train.objective import LOSS_REF_STEPS, DDPMSchedule, lora2_loss, loss_reference, mse_loss, record_loss
from lora2_train.planted import build_planted_task

from tests_helpers import unet_inputs


def test_nu_aim_hand_values_and_rank():
    m = math.log(10.0)  # −ln(1 − 0.9)
    assert R.nu_aim(1, 0.9) == pytest.approx(2 * m, rel=1e-12)
    assert R.nu_aim(8, 0.9) == pytest.approx(m / 7.5, rel=1e-12)
    for r in range(1, 513):
        assert R.effective_rank(R.nu_aim(r, 0.9), 0.9, r_max=1024) == r
        # the aim sits inside rank r's interval of rates, away from both edges
        assert R.nu_target(r, 0.9) < R.nu_aim(r, 0.9) < (R.nu_target(r - 1, 0.9) if r > 1 else math.inf)
    with pytest.raises(ValueError, match="r_target"):
        R.nu_aim(0, 0.9)


def _tiny(cfg=None, **kw):
    torch.manual_seed(0)
    unet, teacher, plan, data = build_planted_task(0, (2, 8), channels=32, depth=3, **kw)
    net = LoRA2Network(cfg or LoRA2Config(r_init=4, r_max=32), unet)
    return unet, teacher, net, data


def test_loss_reference_is_the_mean_of_the_first_steps_then_fixed():
    _, _, net, _ = _tiny()
    assert float(loss_reference(net)) == 0.0  # nothing recorded: L_reg starts with the second step
    losses = [0.5 + 0.1 * i for i in range(LOSS_REF_STEPS + 5)]
    seen = []
    for v in losses:
        record_loss(net, torch.tensor(v))
        seen.append(float(loss_reference(net)))
    assert seen[0] == pytest.approx(0.5)
    assert seen[2] == pytest.approx(statistics.fmean(losses[:3]), rel=1e-6)
    fixed = statistics.fmean(losses[:LOSS_REF_STEPS])
    assert all(v == pytest.approx(fixed, rel=1e-6) for v in seen[LOSS_REF_STEPS - 1:])
    # saved and restored with the network's state; a state saved without it loads and measures again
    state = net.state_dict()
    _, _, other, _ = _tiny()
    other.load_state_dict(state)
    record_loss(other, torch.tensor(100.0))
    assert float(loss_reference(other)) == pytest.approx(fixed, rel=1e-6)
    del state["loss_ref"]
    other.load_state_dict(state)
    record_loss(other, torch.tensor(3.0))
    assert float(loss_reference(other)) == pytest.approx(3.0)


def test_lora2_loss_hand_value_and_detached_reference():
    cfg = LoRA2Config(r_init=4, r_max=32, lambda_r=0.3, beta=7.0, lambda_e=0.5)
    unet, teacher, net, data = _tiny(cfg)
    for layer in net.layers.values():
        layer.lora_up.data.normal_(0, 0.01)
    record_loss(net, 0.4)  # L_ref of the steps before: 0.4
    mse = torch.tensor(0.25, requires_grad=True)
    ent = torch.tensor(2.0)
    total, reg, out_ent = lora2_loss(mse, net, cfg, ent)
    assert float(loss_reference(net)) == pytest.approx((0.4 + 0.25) / 2)  # this step recorded after L_reg
    rank_term, weight_term = net.reg_loss()
    expected_reg = 0.4 * (float(rank_term.detach()) + 7.0 * float(weight_term.detach()))
    assert float(reg) == pytest.approx(expected_reg, rel=1e-5)
    assert float(total) == pytest.approx(0.25 + 0.3 * expected_reg + 0.5 * 2.0, rel=1e-5)
    assert float(out_ent) == 2.0
    total.backward()
    assert float(mse.grad) == pytest.approx(1.0)  # L_ref carries no gradient into the data loss
    # ν and the factors get L_reg's gradient
    assert all(l.rho.grad is not None and l.lora_up.grad is not None for l in net.layers.values())


def _train(unet, teacher, data, cfg, steps, loss_scale=1.0):
    """The library's objective on the planted task; the loss (teacher and student outputs) scaled by `loss_scale`."""
    unet.output_scale *= math.sqrt(loss_scale)
    teacher.output_scale *= math.sqrt(loss_scale)
    net = LoRA2Network(cfg, unet).apply_to()
    opt = torch.optim.Adam(net.param_groups(), eps=1e-12)
    g = torch.Generator().manual_seed(5)
    sched = DDPMSchedule()
    try:
        for step in range(steps):
            b = data.sample(8, g)
            x, t, _ = sched.noisy(b["latents"], g)
            with torch.no_grad():
                y = teacher(x, t, **b["cond"])
            loss = lora2_loss(mse_loss(unet(x, t, **b["cond"]), y), net, cfg)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % cfg.resize_every == 0:
                net.resize(opt)
        return {k: l.effective_rank() for k, l in net.layers.items()}, net.nus()
    finally:
        net.restore()


def test_same_ranks_when_the_loss_is_scaled():
    """L_ref scales with the data loss, so scaling the loss by 10⁴ scales every gradient alike: Adam takes the
    same steps (its ε aside, 10⁻¹² here) and every component ends at the same rank."""
    cfg = LoRA2Config(lr=4e-3, seed=0)
    runs = []
    for scale in (1.0, 1e4):
        unet, teacher, _, data = _tiny()
        runs.append(_train(unet, teacher, data, cfg, steps=60, loss_scale=scale))
    (ranks_a, nu_a), (ranks_b, nu_b) = runs
    assert ranks_a == ranks_b
    assert len(set(ranks_a.values())) > 1  # ragged: the test has something to compare
    for k in nu_a:
        assert nu_b[k] == pytest.approx(nu_a[k], rel=1e-3)


def test_ranks_follow_the_plant_at_two_widths():
    """The same planted task at width 64 and 128 (per-element weight term): both order the levels, and the mean
    learned rank per level agrees within 2× between the widths."""
    levels = (1, 4, 16)
    means = {}
    for width in (64, 128):
        torch.manual_seed(0)
        unet, teacher, plan, data = build_planted_task(0, levels, channels=width, depth=6)
        ranks, _ = _train(unet, teacher, data, LoRA2Config(lr=4e-3, seed=0), steps=200)
        means[width] = [statistics.fmean(ranks[k] for k in plan if plan[k] == v) for v in levels]
        zero = [ranks[k] for k in plan if plan[k] == 0]
        assert sum(r == 1 for r in zero) >= 0.8 * len(zero), (width, zero)
    for width, m in means.items():
        assert m[0] < m[1] < m[2], (width, m)
    for a, b in zip(means[64], means[128]):
        assert 0.5 <= a / b <= 2.0, means


def test_rank_lr_follows_the_weights_lr_unless_set():
    from lora2_train.config import NU_LR_PER_LR

    assert LoRA2Config().nu_lr == 0.0
    assert LoRA2Config(lr=2e-3).rank_lr() == pytest.approx(NU_LR_PER_LR * 2e-3)
    assert LoRA2Config(lr=2e-3).rank_lr(1e-4) == pytest.approx(NU_LR_PER_LR * 1e-4)  # a host's lr wins
    assert LoRA2Config(lr=2e-3, nu_lr=0.3).rank_lr(1e-4) == 0.3  # set explicitly: kept
    # a learning rate that multiplies the optimizer's own estimate (Prodigy's 1.0) is not a step size
    assert LoRA2Config(lr=1.0).rank_lr(step_size=False) == pytest.approx(NU_LR_PER_LR * LoRA2Config.lr)
    _, _, net, _ = _tiny(LoRA2Config(r_init=4, r_max=32, lr=3e-3))
    assert [g["lr"] for g in net.param_groups() if g["name"] == "nu"] == [pytest.approx(NU_LR_PER_LR * 3e-3)]
    _, _, net, _ = _tiny(LoRA2Config(r_init=4, r_max=32, lr=1.0, optimizer="prodigy"))
    assert [g["lr"] for g in net.param_groups() if g["name"] == "nu"] == [pytest.approx(NU_LR_PER_LR * 1e-4)]


def test_ranks_follow_the_plant_at_two_learning_rates():
    """Halving the learning rate and doubling the steps: ρ's rate follows lr (``nu_lr`` 0), so the ranks travel as
    far while the weights learn as much — the mean learned rank per level agrees within 2×."""
    levels = (1, 4, 16)
    means = {}
    for lr, steps in ((4e-3, 100), (2e-3, 200)):
        torch.manual_seed(0)
        unet, teacher, plan, data = build_planted_task(0, levels, channels=64, depth=6)
        ranks, _ = _train(unet, teacher, data, LoRA2Config(lr=lr, seed=0), steps=steps)
        means[lr] = [statistics.fmean(ranks[k] for k in plan if plan[k] == v) for v in levels]
    for lr, m in means.items():
        assert m[0] < m[1] < m[2], (lr, m)
    for a, b in zip(means[4e-3], means[2e-3]):
        assert 0.5 <= a / b <= 2.0, means
