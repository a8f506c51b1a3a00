"""Optimizers and their state across re-allocation (lora2_train.optim), with the real packages:
torch Adam/AdamW, bitsandbytes AdamW8bit (its CPU path), transformers Adafactor, prodigyopt Prodigy,
lion-pytorch Lion."""
import sys

import pytest
import torch
import torch.nn as nn

from lora2_train import optim as O
from lora2_train.layer import AdaptiveLoRA

NAMES = ("adam", "adamw", "adamw8bit", "adafactor", "prodigy", "lion")
LR = {"adam": 1e-2, "adamw": 1e-2, "adamw8bit": 1e-2, "adafactor": 1e-2, "prodigy": 1.0, "lion": 1e-2}
# options so that the small test tensors take the paths big ones take (8-bit state from 16 values on)
OPTIONS = {"adamw8bit": {"min_8bit_size": 16}, "prodigy": {"d0": 1e-2}}


class Student(nn.Module):
    """A linear and a 3×3 conv, each with a LoRA² component, distilling fixed low-rank deltas."""

    def __init__(self, r_init=8):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.conv = nn.Linear(32, 24), nn.Conv2d(6, 16, 3, padding=1)
        self.lin.requires_grad_(False)
        self.conv.requires_grad_(False)
        self.dw_lin = 0.3 * torch.randn(24, 6) @ torch.randn(6, 32) / 32 ** 0.5
        self.dw_conv = 0.3 * torch.einsum("or,rikl->oikl", torch.randn(16, 4), torch.randn(4, 6, 3, 3)) / 54 ** 0.5
        self.layers = nn.ModuleList([
            AdaptiveLoRA("lora_unet_lin", self.lin, r_init=r_init, q=0.9, r_max=16, block=1, seed=1),
            AdaptiveLoRA("lora_unet_conv", self.conv, r_init=r_init, q=0.9, r_max=16, block=1, seed=1)])
        for layer in self.layers:
            layer.apply_to()
        self.gen = torch.Generator().manual_seed(0)

    def loss(self):
        x = torch.randn(16, 32, generator=self.gen)
        img = torch.randn(4, 6, 6, 6, generator=self.gen)
        with torch.no_grad():
            lin = self.layers[0]._base_forward(x) + x @ self.dw_lin.T
            conv = self.layers[1]._base_forward(img) + nn.functional.conv2d(img, self.dw_conv, padding=1)
        return (self.lin(x) - lin).square().mean() + (self.conv(img) - conv).square().mean()

    def groups(self):
        return [{"params": [p for l in self.layers for p in (l.lora_down, l.lora_up)], "name": "lora"},
                {"params": [l.rho for l in self.layers], "lr": 1e-2, "weight_decay": 0.0, "name": "nu"}]


def train(model, opt, steps):
    losses = []
    for _ in range(steps):
        loss = model.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def dense(opt, p, state):
    """Every state tensor of `p` as a dense tensor of p's shape → (tensor, how it follows a gradient
    rescale: 1 first moment, 2 second moment, -1 a copy of the parameter, 0 invariant)."""
    shape = p.shape
    out = {}
    if O._kind(state, shape) == "bnb8":
        import bitsandbytes.functional as BF
        for i in (1, 2):
            if f"state{i}" in state:
                q, absmax = state[f"state{i}"], state[f"absmax{i}"]
                out[f"state{i}"] = (BF.dequantize_blockwise(q, absmax=absmax, code=state[f"qmap{i}"],
                                                            blocksize=256).float().view(shape), i)
        return out
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        mean = row.mean(-1, keepdim=True)  # 0 for a freshly grown conv position (Adafactor adds eps first)
        r = torch.where(mean > 0, row / mean.clamp_min(1e-38), 0.0)
        out["v_hat"] = (r.unsqueeze(-1) * col.unsqueeze(-2), 2)
    for k, v in state.items():
        if k in ("s", "p0") and isinstance(v, torch.Tensor):
            out[k] = (v.expand(shape.numel()).reshape(shape) if v.dim() == 0 else v.view(shape), 1 if k == "s" else -1)
        elif isinstance(v, torch.Tensor) and v.shape == shape:
            moment = 0 if (k == "exp_avg" and "RMS" in state) else 1 if k == "exp_avg" else 2
            out[k] = (v.float(), moment)
    return out


def check_carried(before, opt, layer, name, keep, ratio):
    """Surviving positions keep their state (B's columns follow the rescale by `ratio`), new ones are fresh."""
    tol = {"adamw8bit": 0.03}.get(name, 1e-5)
    for pname, dim, scale in (("lora_down", 0, 1.0), ("lora_up", 1, 1.0 / ratio)):
        p = getattr(layer, pname)
        after = dense(opt, p, opt.state[p])
        assert set(after) == set(before[pname]) and after, (name, pname)
        for k, (old, moment) in before[pname].items():
            new = after[k][0]
            kept_old = old.narrow(dim, 0, keep) * scale ** moment
            kept_new = new.narrow(dim, 0, keep)
            err = float((kept_new - kept_old).abs().max())
            assert err <= tol * float(kept_old.abs().max()) + 1e-12, (name, pname, k, err)
            if new.shape[dim] > keep:
                grown = new.narrow(dim, keep, new.shape[dim] - keep)
                fresh = p.detach().narrow(dim, keep, new.shape[dim] - keep) if k == "p0" else torch.zeros_like(grown)
                if name == "adamw8bit":  # zero within quantization: the dynamic code's value nearest 0
                    assert float((grown - fresh).abs().max()) <= 1e-4 * float(old.abs().max()), (name, pname, k)
                else:
                    assert torch.equal(grown, fresh), (name, pname, k)


def snapshot(opt, layer):
    return {n: {k: (t.clone(), m) for k, (t, m) in dense(opt, getattr(layer, n), opt.state[getattr(layer, n)]).items()}
            for n in ("lora_down", "lora_up")}


@pytest.mark.parametrize("in_place", [False, True], ids=["new-params", "in-place"])
@pytest.mark.parametrize("name", NAMES)
def test_resize_carries_state_and_training_goes_on(name, in_place):
    model = Student(r_init=8)
    opt = O.build_optimizer(name, model.groups(), LR[name], **OPTIONS.get(name, {}))
    losses = train(model, opt, 12)
    if name == "adamw8bit":
        assert opt.state[model.layers[0].lora_down]["state1"].dtype == torch.uint8  # the 8-bit path ran
    for new_rank, keep in ((12, 8), (5, 5)):  # grow, then shrink
        befores = [snapshot(opt, l) for l in model.layers]
        ratios = []
        for layer in model.layers:
            nu = layer.nu().detach().double()
            ratios.append(float(torch.expm1(-nu * new_rank) / torch.expm1(-nu * layer.rank)))
            assert layer.resize(new_rank, opt, in_place=in_place)
        for layer, before, ratio in zip(model.layers, befores, ratios):
            assert layer.rank == new_rank
            check_carried(before, opt, layer, name, keep, ratio)
        after_resize = float(model.loss().detach())
        more = train(model, opt, 12)
        assert all(torch.isfinite(torch.tensor(more)))
        assert sum(more[-3:]) / 3 < after_resize, (name, new_rank, after_resize, more)
        losses += more
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], (name, losses[0], losses[-3:])


@pytest.mark.parametrize("name", ["prodigy", "adafactor"])
def test_rank_parameters_keep_their_own_rate(name):
    """Under Prodigy and Adafactor ρ is stepped by a plain Adam at nu_lr: its first step is nu_lr."""
    model = Student()
    opt = O.build_optimizer(name, model.groups(), LR[name])
    assert isinstance(opt, O.WithRankOptimizer)
    assert all(not any(p is l.rho for g in opt.main.param_groups for p in g["params"]) for l in model.layers)
    with torch.no_grad():  # B ≠ 0, so that Λ (and ρ) gets a gradient at the first step
        for l in model.layers:
            l.lora_up.normal_(std=0.1)
    rho0 = [float(l.rho.detach()) for l in model.layers]
    train(model, opt, 1)
    steps = [abs(float(l.rho.detach()) - r) for l, r in zip(model.layers, rho0)]
    assert steps == pytest.approx([1e-2, 1e-2], rel=1e-3)
    state = opt.state_dict()
    opt2 = O.build_optimizer(name, model.groups(), LR[name])
    opt2.load_state_dict(state)
    assert opt2.rank.state_dict()["state"][0]["step"] == 1


def test_adafactor_non_factored_state_is_carried():
    """Adafactor keeps an unfactored exp_avg_sq for 1-D parameters."""
    from transformers.optimization import Adafactor

    p = nn.Parameter(torch.randn(12))
    opt = Adafactor([p], lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, beta1=0.9)
    for _ in range(3):
        p.grad = torch.randn(12)
        opt.step()
    st = opt.state[p]
    assert "exp_avg_sq" in st and "exp_avg_sq_row" not in st
    new = torch.randn(16)
    out = O.carry_state(st, p.shape, new, 0, 12, grad_scale=2.0)
    assert torch.allclose(out["exp_avg_sq"][:12], st["exp_avg_sq"] * 4) and torch.all(out["exp_avg_sq"][12:] == 0)
    assert torch.equal(out["exp_avg"][:12], st["exp_avg"])  # normalized updates: unchanged by the rescale
    shrunk = O.carry_state(st, p.shape, new[:5], 0, 5)
    assert torch.equal(shrunk["exp_avg_sq"], st["exp_avg_sq"][:5])


def test_prodigy_sliced_statistics_are_carried():
    """Prodigy with slice_p > 1 keeps s and p0 of every kept position it had sampled."""
    from prodigyopt import Prodigy

    p = nn.Parameter(torch.randn(6, 5))
    opt = Prodigy([p], lr=1.0, slice_p=4)
    for _ in range(2):
        p.grad = torch.randn(6, 5)
        opt.step()
    st, group = opt.state[p], opt.param_groups[0]
    new = torch.randn(6, 8)
    out = O.carry_state(st, p.shape, new, 1, 5, group=group)
    assert out["s"].shape == (len(range(0, 48, 4)),) and out["p0"].shape == out["s"].shape
    old_s, old_p0 = torch.zeros(30), torch.zeros(30)
    old_s[::4], old_p0[::4] = st["s"], st["p0"]
    for flat in range(0, 48, 4):
        i, j = divmod(flat, 8)
        got_s, got_p0 = out["s"][flat // 4], out["p0"][flat // 4]
        if j < 5 and (i * 5 + j) % 4 == 0:
            assert got_s == old_s[i * 5 + j] and got_p0 == old_p0[i * 5 + j]
        else:
            assert got_s == 0 and got_p0 == new[i, j]


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)
    with pytest.raises(O.OptimizerUnavailable, match=r"^optimizer 'lion' needs the package lion-pytorch: "
                                                     r"pip install lion-pytorch$"):
        O.build_optimizer("lion", Student().groups(), 1e-3)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        O.build_optimizer("sgd", Student().groups(), 1e-3)


def test_unknown_state_layout_is_refused_before_anything_changes():
    layer = Student().layers[0]
    opt = torch.optim.SGD([layer.lora_down], lr=1e-3)
    opt.state[layer.lora_down] = {"state1": torch.zeros(layer.lora_down.shape, dtype=torch.uint8)}
    down = layer.lora_down
    with pytest.raises(O.StateError, match="without qmap1/absmax1.*use one of those"):
        layer.resize(12, opt)
    assert layer.lora_down is down and layer.rank == 8


def test_sd_scripts_optimizer_names():
    from argparse import Namespace

    assert O.check_sd_scripts_optimizer("AdamW8bit") == "adamw8bit"
    assert O.check_sd_scripts_optimizer("Prodigy") == "prodigy" and O.needs_rank_optimizer("prodigy")
    assert O.check_sd_scripts_optimizer("transformers.optimization.Adafactor") == "adafactor"
    assert O.sd_scripts_optimizer_type(Namespace(use_8bit_adam=True, optimizer_type="")) == "AdamW8bit"
    assert O.sd_scripts_optimizer_type(Namespace(optimizer_type=None)) == "AdamW"
    with pytest.raises(ValueError, match="DAdaptAdam: .*use Prodigy$"):
        O.check_sd_scripts_optimizer("DAdaptAdam")
    with pytest.raises(ValueError, match="AdamWScheduleFree: .*use AdamW$"):
        O.check_sd_scripts_optimizer("AdamWScheduleFree")


def test_embedded_trainer_resumes_exactly_with_prodigy(tmp_path, name="prodigy"):
    """The embedded trainer with a non-Adam optimizer: re-allocations inside the run, checkpoint, resume."""
    from lora2_train.config import LoRA2Config
    from lora2_train.models import SDXLUNet, koala_700m_config, reduced
    from lora2_train.network import LoRA2Network
    from lora2_train.planted import RandomConditioning
    from lora2_train.trainer import Trainer

    def run(steps, out, resume=None, stop_after=None):
        torch.manual_seed(0)
        unet = SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8))
        unet.requires_grad_(False)
        cfg = LoRA2Config(r_init=4, r_target=4, r_max=16, lr=LR[name] / 10, nu_lr=0.5, steps=steps, resize_every=2,
                          checkpoint_every=2, batch_size=2, lambda_r=0.0, rank_block=1, optimizer=name,
                          extra={"optimizer_args": OPTIONS.get(name, {})})
        net = LoRA2Network(cfg, unet).apply_to()
        calls = iter(range(100))
        stop = (lambda: next(calls) >= stop_after) if stop_after else None
        res = Trainer(unet, net, RandomConditioning(4, 8, 32, 64, tokens=6), cfg, out_dir=out,
                      should_stop=stop).train(resume)
        return net, res

    full, res = run(4, tmp_path / "a")
    assert any(h["ranks"] != res.history[0]["ranks"] for h in res.history)  # re-allocated on the way
    assert run(4, tmp_path / "b", stop_after=3)[1].stopped
    resumed, _ = run(4, tmp_path / "c", resume=tmp_path / "b" / "checkpoint.pt")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
