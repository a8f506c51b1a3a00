"""Training-time parameter budget ``max_params``: re-allocation keeps Σ D·(in+out) within it, rank blocks
allotted by f-mass across components (the load-time --params allotment), on both backends."""
import math

import pytest
import torch

from lora2_train.config import ConfigError, LoRA2Config
from lora2_train.models import SDXLUNet, koala_700m_config, reduced
from lora2_train.network import LoRA2Network
from lora2_train.planted import RandomConditioning
from lora2_train.trainer import Trainer


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8)).requires_grad_(False)


def cost(layer):
    return layer.in_dim + layer.out_dim


def check_allotment(net, targets):
    """Every rank within target and floor; the budget held; and the greedy order: a component that lost a
    block with more f-mass than some other component's last kept block only lost it for its larger cost."""
    budget = net.config.max_params
    assert net.num_parameters() <= budget
    last_kept, first_lost = {}, {}
    for k, layer in net.layers.items():
        r, t, b = layer.rank, targets[k], layer.block
        assert min(b, t) <= r <= t and (r % b == 0 or r == t)
        nu = float(layer.nu().detach())
        mass = lambda a: math.exp(-nu * a) - math.exp(-nu * min(a + b, t))  # noqa: E731
        if r > b:
            last_kept[k] = mass(r - b)
        if r < t:
            first_lost[k] = mass(r)
    assert first_lost, "the budget cut nothing"
    for a, lost in first_lost.items():
        for k, kept in last_kept.items():
            if lost > kept:
                assert cost(net.layers[a]) > cost(net.layers[k]), (a, k, lost, kept)


def spread_ranks(net):
    """ν of the components set to ranks 4…16, so that the f-masses of their blocks differ."""
    targets = {}
    for i, (k, layer) in enumerate(net.layers.items()):
        with torch.no_grad():
            layer.rho.fill_(layer._rho_for_rank(4 + 4 * (i % 4)))
        targets[k] = layer.target_rank()
    return targets


def test_budget_cuts_reallocation_by_f_mass(unet):
    full = LoRA2Network(LoRA2Config(r_init=4, r_target=4, r_max=16), unet)
    targets = spread_ranks(full)
    want = sum(t * cost(full.layers[k]) for k, t in targets.items())
    budget = want // 2
    net = LoRA2Network(LoRA2Config(r_init=4, r_target=4, r_max=16, max_params=budget), unet)
    spread_ranks(net)
    net.resize()
    check_allotment(net, targets)
    assert net.num_parameters() > 0.9 * budget  # the budget is used, not just respected


def test_budget_applies_from_the_start_and_refuses_below_one_block(unet):
    net = LoRA2Network(LoRA2Config(r_init=16, r_target=16, r_max=16, max_params=100_000), unet)
    assert net.num_parameters() <= 100_000 and len(set(net.ranks().values())) > 1
    with pytest.raises(ConfigError, match=r"^LoRA2Config.max_params 10 is below \d+, the size of the smallest"):
        LoRA2Network(LoRA2Config(r_init=4, r_target=4, r_max=16, max_params=10), unet)
    with pytest.raises(ConfigError, match="max_params must be an integer >= 0"):
        LoRA2Config(max_params=-1)


def test_embedded_trainer_stays_within_budget(unet):
    cfg = LoRA2Config(r_init=4, r_target=4, r_max=16, lr=1e-3, nu_lr=0.5, lambda_r=0.0, steps=6, resize_every=2,
                      batch_size=2, max_params=90_000)
    free = LoRA2Network(LoRA2Config(**{**cfg.to_dict(), "max_params": 0}), unet).apply_to()
    grown = Trainer(unet, free, RandomConditioning(4, 8, 32, 64, tokens=6), cfg).train()
    free.restore()
    assert grown.num_params > 90_000  # without the budget this run grows past it
    net = LoRA2Network(cfg, unet).apply_to()
    sizes = []
    res = Trainer(unet, net, RandomConditioning(4, 8, 32, 64, tokens=6), cfg,
                  callback=lambda e: sizes.append(e.num_params)).train()
    net.restore()
    assert max(sizes) <= 90_000 and res.steps == 6


def test_kohya_network_stays_within_budget(unet):
    from lora2_train.kohya import network as kn
    from tests_helpers import unet_inputs

    net = kn.create_network(1.0, 4, 1, None, [], unet, r_max="16", resize_every="1", rank_block="4", nu_lr="0.5",
                            max_params="90000")
    try:
        assert net.config.max_params == 90_000
        net.apply_to(None, unet)
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        params = [id(p) for p in net.parameters()]
        for layer in net.layers.values():  # ν as if learned toward rank 16 everywhere
            layer.rho.data.fill_(layer._rho_for_rank(16))
        x, t, ctx, y = unet_inputs(unet, batch=1)
        opt.zero_grad()
        unet(x, t, ctx, y).square().mean().backward()
        opt.step()
        assert net.steps == 1 and net.num_parameters() <= 90_000
        assert max(net.ranks().values()) > 4 and [id(p) for p in net.parameters()] == params
    finally:
        net.close()
