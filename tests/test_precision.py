"""ρ stays float32 when the network is cast (sd-scripts --full_bf16 runs ``network.to(bf16)``), so ν learns
in a bf16 network as it does in float32; a bf16 ρ would stall (its spacing near ρ ≈ −4 is 2⁻⁵)."""
import pytest
import torch
import torch.nn as nn

from lora2_train import rank as R
from lora2_train.layer import AdaptiveLoRA

STEPS = 100


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bases = nn.ModuleList(nn.Linear(128, 128) for _ in range(3)).requires_grad_(False)
        self.layers = nn.ModuleList(AdaptiveLoRA(f"lora_unet_{i}", b, r_init=64, q=0.9, r_max=512, block=4, seed=i)
                                    for i, b in enumerate(self.bases))
        for layer in self.layers:
            layer.apply_to()
        self.targets = [0.1 * torch.randn(128, 8) @ torch.randn(8, 128) / 128 ** 0.5 for _ in self.bases]

    def loss(self, g, dtype):
        x = torch.randn(32, 128, generator=g).to(dtype)
        mse = sum((b(x).float() - (layer._base_forward(x).float() + x.float() @ t.T)).square().mean()
                  for b, layer, t in zip(self.bases, self.layers, self.targets))
        nu_t = R.nu_target(16, 0.9)
        reg = sum((l.nu() - nu_t).abs() for l in self.layers) / len(self.layers)
        return mse + 0.01 * reg


def rho_trajectory(nu_lr, cast=None, demote_rho=False):
    net = Net()
    if cast is not None:
        net.to(cast)
    if demote_rho:  # what a plain nn.Module cast does to ρ
        for layer in net.layers:
            layer.rho.data = layer.rho.data.to(cast)
    weights = [p for l in net.layers for p in (l.lora_down, l.lora_up)]
    opt = torch.optim.AdamW([{"params": weights, "lr": 1e-3},
                             {"params": [l.rho for l in net.layers], "lr": nu_lr, "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(1)
    traj = [torch.stack([l.rho.detach().float() for l in net.layers])]
    for _ in range(STEPS):
        opt.zero_grad()
        net.loss(g, cast or torch.float32).backward()
        opt.step()
        traj.append(torch.stack([l.rho.detach().float() for l in net.layers]))
    return net, torch.stack(traj)


@pytest.mark.parametrize("nu_lr", [5e-3, 1e-2])
def test_bf16_cast_network_learns_nu_like_fp32(nu_lr):
    _, ref = rho_trajectory(nu_lr)
    net, cast = rho_trajectory(nu_lr, torch.bfloat16)
    assert net.layers[0].lora_down.dtype == torch.bfloat16 and net.layers[0].rho.dtype == torch.float32
    moved = (ref[-1] - ref[0]).abs()
    assert float(moved.min()) > 0.3 * nu_lr * STEPS  # ν really learns over the run
    # the bf16 network's ρ follows the float32 one within 5 % of the distance travelled, at every step
    assert float((cast - ref).abs().max()) <= 0.05 * float(moved.min())
    # control: a bf16 ρ (a plain cast) does not: at ρ ≈ −4 its spacing is 2⁻⁵, so Adam steps of nu_lr
    # (< 2⁻⁶) round back to where they started
    _, stalled = rho_trajectory(nu_lr, torch.bfloat16, demote_rho=True)
    assert float((stalled[-1] - stalled[0]).abs().max()) == 0.0


def test_casts_keep_rho_a_float32_parameter_of_the_same_identity():
    layer = Net().layers[0]
    rho, value = layer.rho, layer.rho.detach().clone()
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.rho is rho and rho.dtype == torch.float32 and torch.equal(rho.detach(), value)
    assert layer.lam_scale.dtype == torch.float32 and layer.lora_up.dtype == torch.float16
    layer.float()
    assert layer.lora_down.dtype == torch.float32 and torch.equal(layer.rho.detach(), value)
