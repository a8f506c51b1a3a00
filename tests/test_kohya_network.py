"""The sd-scripts network module (lora2_train.kohya.network) on an SDXL-layout UNet and two CLIP encoders."""
import json

import pytest
import torch
from safetensors import safe_open

from tests_helpers import unet_inputs
from lora2_train.config import ConfigError, LoRA2Config
from lora2_train.format import AdapterFormatError, load_adapter
from lora2_train.kohya import network as kn
from lora2_train.models import SDXLUNet, reduced, sdxl_config
from tests_helpers import tiny_clip_text_model

TE_TARGETS = "attn1,attn2,te_attn"


@pytest.fixture(scope="module")
def small_unet():
    """SDXL layout (ldm paths, all levels and the middle block) with one transformer block per level."""
    torch.manual_seed(0)
    return SDXLUNet(reduced(sdxl_config(), depth=(0, 1, 1), middle=1)).requires_grad_(False)


@pytest.fixture
def encoders():
    return [tiny_clip_text_model(), tiny_clip_text_model(width=48)]


def make(unet, tes, dim=8, **args):
    args = {k: str(v) for k, v in args.items()}
    net = kn.create_network(1.0, dim, 1, None, tes, unet, neuron_dropout=None, dropout=None, **args)
    return net


def loss_of(unet, net, seed=0):
    x, t, ctx, y = unet_inputs(unet, batch=1, seed=seed)
    return unet(x, t, ctx, y).square().mean() + net.reg_loss()[0]


def test_create_network_keys_ranks_and_config(tiny_sdxl, encoders):
    net = make(tiny_sdxl, encoders, dim=8, targets=TE_TARGETS, r_max=32, q="0.8", nu_lr="0.05")
    try:
        keys = list(net.layers)
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in keys
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0" in keys
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in keys
        assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in keys
        assert set(net.ranks().values()) == {8}
        c = net.config
        # --network_dim is r_init; everything not given keeps LoRA2Config's defaults (r_target among them)
        assert (c.r_init, c.r_target, c.r_max, c.q, c.nu_lr) == (8, LoRA2Config.r_target, 32, 0.8, 0.05)
    finally:
        net.close()


def test_network_args_errors(small_unet, encoders):
    with pytest.raises(ConfigError, match="unknown key 'rank'"):
        make(small_unet, encoders, rank=4)
    with pytest.raises(ConfigError, match="r_max=.*not a valid int"):
        make(small_unet, encoders, r_max="big")
    with pytest.raises(ConfigError, match="dropout"):
        kn.create_network(1.0, 8, 1, None, encoders, small_unet, dropout="0.1")
    with pytest.raises(ConfigError, match="network_dropout"):
        kn.create_network(1.0, 8, 1, None, encoders, small_unet, neuron_dropout=0.1)
    with pytest.raises(ConfigError, match="two text encoders"):
        make(small_unet, encoders[0], targets=TE_TARGETS)
    with pytest.raises(ConfigError, match="targets"):
        make(small_unet, encoders, targets="everything")


def test_apply_to_patches_and_drops_untrained_parts(small_unet, encoders):
    net = make(small_unet, encoders, targets=TE_TARGETS)
    try:
        x, t, ctx, y = unet_inputs(small_unet, batch=1)
        before = small_unet(x, t, ctx, y)
        net.apply_to(encoders, small_unet, apply_text_encoder=False, apply_unet=True)
        assert net.layers and all(k.startswith("lora_unet_") for k in net.layers)
        for layer in net.layers.values():
            layer.lora_up.data.normal_()
        after = small_unet(x, t, ctx, y)
        assert not torch.allclose(before, after)
        net.set_multiplier(0.0)
        assert torch.allclose(before, small_unet(x, t, ctx, y))
    finally:
        net.close()
    assert torch.allclose(before, small_unet(x, t, ctx, y))


def test_optimizer_groups_with_te_lrs_and_nu_lr(small_unet, encoders):
    net = make(small_unet, encoders, targets=TE_TARGETS, nu_lr="0.03")
    try:
        groups, desc = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
        assert desc == ["textencoder 1", "textencoder 2", "unet", "nu"]
        assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4, 0.03]
        assert groups[3]["weight_decay"] == 0.0 and all(p.dim() == 0 for p in groups[3]["params"])
        n_params = sum(len(g["params"]) for g in groups)
        assert n_params == len(list(net.parameters()))
        # None → default lr; 0 → the part is frozen and left out (as sd-scripts does)
        groups, desc = net.prepare_optimizer_params(0, None, 1e-3)
        assert desc == ["unet", "nu"] and groups[0]["lr"] == 1e-3
        net.prepare_grad_etc(encoders, small_unet)
        frozen = [k for k, l in net.layers.items() if not l.lora_down.requires_grad]
        assert frozen and all(k.startswith("lora_te") for k in frozen)
        assert all(p.requires_grad for p in net.get_trainable_params())
    finally:
        net.close()


class WrappedOptimizer:
    """Stands for accelerate's AcceleratedOptimizer: the torch optimizer behind ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def test_adamw_steps_resize_in_place_keeps_parameters(small_unet, encoders):
    net = make(small_unet, encoders, dim=8, r_max=16, resize_every=2, rank_block=1)
    try:
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-3, 1e-3)
        opt = WrappedOptimizer(torch.optim.AdamW(groups, lr=1e-3))
        keys = list(net.layers)
        grow, shrink = net.layers[keys[0]], net.layers[keys[1]]
        params_before = [id(p) for p in net.parameters()]
        seen = []
        net.step_listeners.append(lambda step, resized: seen.append((step, dict(resized))))
        for step in range(3):
            if step == 1:  # move ν so that D(ν) changes at the resize after step 2
                grow.rho.data.fill_(grow._rho_for_rank(12))
                shrink.rho.data.fill_(shrink._rho_for_rank(3))
            opt.zero_grad()
            loss = loss_of(small_unet, net, seed=step)
            loss.backward()
            opt.step()
        assert net.optimizer is opt.optimizer and net.steps == 3
        assert [s for s, _ in seen] == [1, 2, 3]
        assert seen[1][1][keys[0]] == (8, grow.target_rank()) and grow.rank > 8
        assert seen[1][1][keys[1]][0] == 8 and shrink.rank < 8
        assert [id(p) for p in net.parameters()] == params_before
        for g in opt.optimizer.param_groups:
            for p in g["params"]:
                st = opt.optimizer.state[p]
                assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
        assert torch.isfinite(loss_of(small_unet, net))
    finally:
        net.close()


def test_in_place_resize_carries_state_of_surviving_positions(small_unet, encoders):
    net = make(small_unet, encoders, dim=8, r_max=16, rank_block=1)
    try:
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        loss_of(small_unet, net).backward()
        opt.step()
        layer = next(iter(net.layers.values()))
        down, up = layer.lora_down, layer.lora_up
        m_down = opt.state[down]["exp_avg"].clone()
        m_up = opt.state[up]["exp_avg_sq"].clone()
        layer.rho.data.fill_(layer._rho_for_rank(5))
        nu = layer.nu().detach().double()
        ratio = float(torch.expm1(-nu * 5) / torch.expm1(-nu * 8))  # B's kept columns are rescaled by it
        net.attach_optimizer(opt)
        changed = net.resize(opt, in_place=True)
        assert changed[layer.name] == (8, 5)
        assert layer.lora_down is down and down.shape[0] == 5 and down.grad is None
        assert torch.equal(opt.state[down]["exp_avg"], m_down[:5])
        assert torch.allclose(opt.state[up]["exp_avg_sq"], m_up[:, :5] / ratio ** 2)
        layer.rho.data.fill_(layer._rho_for_rank(10))
        net.resize(opt, in_place=True)
        assert torch.equal(opt.state[down]["exp_avg"][:5], m_down[:5])
        assert opt.state[down]["exp_avg"][5:].abs().sum() == 0
    finally:
        net.close()


def test_refuses_unknown_8bit_state_layout(small_unet, encoders):
    net = make(small_unet, encoders, dim=4)
    try:
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.SGD(groups, lr=1e-3)
        p = net.weight_parameters()[0]
        opt.state[p] = {"state1": torch.zeros(p.shape, dtype=torch.uint8), "absmax1": torch.zeros(1)}
        with pytest.raises(RuntimeError, match="without qmap1/absmax1.*AdamW, AdamW8bit"):
            net.attach_optimizer(opt)
    finally:
        net.close()


def _sd_args(optimizer_type, **kw):
    from argparse import Namespace
    return Namespace(optimizer_type=optimizer_type, use_8bit_adam=False, use_lion_optimizer=False, **kw)


def test_adamw8bit_in_place_resizes_carry_quantized_state(small_unet, encoders):
    """sd-scripts' AdamW8bit (bitsandbytes, its CPU path): state carried through in-place re-allocation."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    net = make(small_unet, encoders, dim=8, r_max=16, resize_every=2, rank_block=1)
    try:
        net.prepare_network(_sd_args("AdamW8bit"))
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-3, 1e-3)
        opt = WrappedOptimizer(bnb.optim.AdamW8bit(groups, lr=1e-3, min_8bit_size=16))
        layer = next(iter(net.layers.values()))
        down = layer.lora_down
        for step in range(3):
            if step == 1:
                layer.rho.data.fill_(layer._rho_for_rank(12))
                st = opt.optimizer.state[down]
                m = BF.dequantize_blockwise(st["state1"], absmax=st["absmax1"], code=st["qmap1"], blocksize=256)
            opt.zero_grad()
            loss_of(small_unet, net, seed=step).backward()
            opt.step()
            if step == 1:  # the re-allocation after step 2 carried the state of step 2
                assert layer.rank == 12 and layer.lora_down is down
                st = opt.optimizer.state[down]
                assert st["state1"].dtype == torch.uint8 and st["state1"].shape == (12, down.shape[1])
                assert st["absmax1"].numel() == -(-down.numel() // 256)
        assert torch.isfinite(loss_of(small_unet, net)) and m.shape[0] == 8
    finally:
        net.close()


@pytest.mark.parametrize("kind", ["Prodigy", "Adafactor"])
def test_prodigy_and_adafactor_leave_rho_to_its_own_adam(small_unet, encoders, kind):
    """sd-scripts builds Prodigy / Adafactor from the groups; ρ is not among them and moves by nu_lr."""
    from prodigyopt import Prodigy
    from transformers.optimization import Adafactor

    net = make(small_unet, encoders, dim=8, r_max=16, resize_every=2, rank_block=1, nu_lr=0.02)
    try:
        net.prepare_network(_sd_args(kind))
        net.apply_to(encoders, small_unet)
        groups, desc = net.prepare_optimizer_params_with_multiple_te_lrs(None, 1.0, 1.0)
        assert "nu" not in desc and net.rank_optimizer is not None
        rho = net.rank_parameters()
        assert not any(p is r for g in groups for p in g["params"] for r in rho)
        assert all(not any(p is r for r in rho) for p in net.get_trainable_params())
        opt = (Prodigy(groups, lr=1.0) if kind == "Prodigy" else Adafactor(groups, lr=None, relative_step=True))
        with torch.no_grad():
            for layer in net.layers.values():
                layer.lora_up.normal_(std=0.3)  # so that ρ gets a gradient (well above Adam's eps) at the first step
        before = torch.stack([p.detach().clone() for p in rho])
        for step in range(3):
            opt.zero_grad()
            loss_of(small_unet, net, seed=step).backward()
            opt.step()
            if step == 0:
                moved = (torch.stack([p.detach() for p in rho]) - before).abs()
                # Adam's first step is nu_lr·g/(|g|+eps): nu_lr where the gradient is well above eps
                assert float(moved.max()) <= 0.02 * (1 + 1e-4) and float(moved.median()) == pytest.approx(0.02, rel=1e-3)
                assert all(p.grad is None for p in rho)
        assert net.steps == 3 and torch.isfinite(loss_of(small_unet, net))
    finally:
        net.close()


def test_refuses_optimizers_it_cannot_carry(small_unet, encoders):
    net = make(small_unet, encoders, dim=4)
    try:
        with pytest.raises(ConfigError, match="DAdaptAdam: .*use Prodigy"):
            net.prepare_network(_sd_args("DAdaptAdam"))
    finally:
        net.close()


def test_gradient_checkpointing_computes_lam_per_component(small_unet, encoders):
    net = make(small_unet, encoders, dim=4)
    try:
        net.apply_to(encoders, small_unet)
        assert net._hooks
        net.enable_gradient_checkpointing()
        assert not net._hooks
        loss_of(small_unet, net).backward()
        assert all(l.rho.grad is not None for l in net.layers.values())
    finally:
        net.close()


def ragged(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(net.layers.values()):
        layer.set_rank([3, 8, 13, 1][i % 4])
        layer.lora_up.data.copy_(torch.randn(layer.lora_up.shape, generator=g) * 0.1)


def test_save_weights_and_create_network_from_weights_round_trip(tmp_path, small_unet, encoders):
    net = make(small_unet, encoders, dim=8, targets=TE_TARGETS, r_max=16, q="0.85")
    try:
        ragged(net)
        path = tmp_path / "lora2.safetensors"
        meta = {"ss_output_name": "lora2", "ss_base_model_version": "sdxl_base_v1-0", "ss_seed": 42,
                "ss_network_args": json.dumps({"r_max": "16"})}
        net.save_weights(str(path), torch.float32, meta)
        with safe_open(str(path), "pt") as f:
            m = f.metadata()
        assert m["ss_output_name"] == "lora2" and m["ss_seed"] == "42"
        assert m["ss_network_module"] == "networks.lora" and m["ss_network_dim"] == "13"
        assert m["lora2_network_module"] == "lora2_train.kohya.network" and m["lora2_dtype"] == "fp32"
        assert json.loads(m["lora2_ranks"]) == net.ranks()
        cfg = json.loads(m["lora2_config"])
        assert cfg["trainer"] == "sd-scripts" and (cfg["q"], cfg["r_max"], cfg["r_init"]) == (0.85, 16, 8)
        # sd-scripts' own settings are in its ss_* keys, not recorded as the library's defaults
        assert not {"lr", "optimizer", "batch_size", "lr_scheduler", "mixed_precision"} & set(cfg)
        adapter = load_adapter(path)
        assert adapter.ranks() == net.ranks()

        back, sd = kn.create_network_from_weights(1.0, str(path), None, encoders, small_unet)
        try:
            assert back.ranks() == net.ranks()
            assert (back.config.q, back.config.r_max, back.config.r_init) == (0.85, 16, 8)
            assert set(back.config.targets) == {"attn1", "attn2", "te_attn"}
            for k, layer in net.layers.items():
                assert torch.allclose(back.layers[k].delta_weight(), layer.delta_weight(), atol=1e-6)
                assert back.layers[k].nu().item() == pytest.approx(layer.nu().item(), rel=1e-5)
                assert torch.equal(back.layers[k].lam_scale, layer.lam_scale)
            assert f"{k}.lora_down.weight" in sd
        finally:
            back.close()

        # --network_weights: a fresh network at another r_init takes the file's ragged ranks
        fresh = make(small_unet, encoders, dim=4, targets=TE_TARGETS, r_max=16, q="0.85")
        try:
            info = fresh.load_weights(str(path))
            assert "components loaded" in info
            assert fresh.ranks() == net.ranks()
            k = next(iter(net.layers))
            assert torch.allclose(fresh.layers[k].delta_weight(), net.layers[k].delta_weight(), atol=1e-6)
        finally:
            fresh.close()
    finally:
        net.close()


def test_fp16_save_and_merge_to(tmp_path, small_unet, encoders):
    net = make(small_unet, encoders, dim=8, r_max=16)
    try:
        ragged(net, seed=1)
        path = tmp_path / "half.safetensors"
        net.save_weights(str(path), torch.float16, {})
        assert load_adapter(path).metadata["lora2_dtype"] == "fp16"
        k, layer = next(iter(net.layers.items()))
        w0 = layer.base.weight.detach().clone()
        inf, sd = kn.create_network_from_weights(0.5, str(path), None, encoders, small_unet, for_inference=True)
        assert inf.is_mergeable()
        try:
            inf.merge_to(encoders, small_unet, sd, torch.float32, "cpu")
            assert torch.allclose(layer.base.weight - w0, 0.5 * layer.delta_weight(), atol=2e-3)
        finally:
            layer.base.weight.data.copy_(w0)
            inf.close()
    finally:
        net.close()


def test_from_weights_errors(tmp_path, small_unet, tiny_koala, encoders):
    net = make(small_unet, encoders, dim=8, r_max=16)
    try:
        ragged(net)
        path = tmp_path / "x.safetensors"
        net.save_weights(str(path), torch.float32, {})
    finally:
        net.close()
    with pytest.raises(AdapterFormatError, match="no counterpart in this model"):
        kn.create_network_from_weights(1.0, str(path), None, encoders, tiny_koala)
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        kn.create_network_from_weights(1.0, str(tmp_path / "nope.safetensors"), None, encoders, small_unet)
    small = make(small_unet, encoders, dim=4, r_max=8)
    try:
        with pytest.raises(ConfigError, match="rank 13 above r_max=8"):
            small.load_weights(str(path))
    finally:
        small.close()


def test_max_norm_regularization(small_unet, encoders):
    net = make(small_unet, encoders, dim=4)
    try:
        ragged(net)
        norms = [float(l.delta_weight().norm()) for l in net.layers.values()]
        cap = sorted(norms)[len(norms) // 2]
        scaled, mean, top = net.apply_max_norm_regularization(cap, "cpu")
        assert scaled == sum(n > cap for n in norms) > 0
        assert top == pytest.approx(cap, rel=1e-4)
        assert max(float(l.delta_weight().norm()) for l in net.layers.values()) == pytest.approx(cap, rel=1e-4)
    finally:
        net.close()


def test_resume_state_at_other_ranks_keeps_parameters_and_optimizer_state(small_unet, encoders):
    """sd-scripts --resume: accelerate loads the network's state_dict, then the optimizer's."""
    net = make(small_unet, encoders, dim=8, r_max=16)
    fresh = make(small_unet, encoders, dim=8, r_max=16)
    try:
        ragged(net)
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        loss_of(small_unet, net).backward()
        opt.step()
        state, opt_state = net.state_dict(), opt.state_dict()
        groups2, _ = fresh.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt2 = torch.optim.AdamW(groups2, lr=1e-3)
        params = [id(p) for p in fresh.parameters()]
        fresh.load_state_dict(state)
        opt2.load_state_dict(opt_state)
        assert fresh.ranks() == net.ranks() and [id(p) for p in fresh.parameters()] == params
        k = next(iter(net.layers))
        assert torch.equal(fresh.layers[k].delta_weight(), net.layers[k].delta_weight())
        assert torch.equal(opt2.state[fresh.layers[k].lora_up]["exp_avg"], opt.state[net.layers[k].lora_up]["exp_avg"])
    finally:
        net.close()
        fresh.close()


class _Accelerator:
    @staticmethod
    def unwrap_model(m):
        return m


class _TrainerBase:
    """The slice of sd-scripts' NetworkTrainer the extension overrides: same method names and parameters."""

    def __init__(self):
        pass

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        pass

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True):
        x, t, ctx, y = batch
        return unet(x, t, ctx, y).square().mean()

    def train(self, args):
        pass


def _args(tmp_path, **kw):
    from argparse import Namespace
    base = dict(network_module="lora2_train.kohya.network", optimizer_type="AdamW", use_8bit_adam=False,
                network_args=["lambda_e=0.1", "lambda_r=2", "resize_every=1"], network_dim=8,
                gradient_checkpointing=False, max_train_steps=2, output_dir=str(tmp_path), output_name="x",
                save_precision="fp16")
    base.update(kw)
    return Namespace(**base)


def test_trainer_extension_adds_reg_and_entropy_and_prints_progress(tmp_path, small_unet, encoders, capsys):
    from lora2_train.kohya.launch import parse_progress_line
    from lora2_train.kohya.train import make_trainer_class

    trainer = make_trainer_class(_TrainerBase)()
    args = _args(tmp_path)
    trainer.assert_extra_args(args, None, None)
    net = make(small_unet, encoders, dim=8, lambda_e=0.1, lambda_r=2, resize_every=1, r_target=4, nu_lr=0.5,
               rank_block=1)
    try:
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        batch = unet_inputs(small_unet, batch=1)
        call = (batch, encoders, small_unet, net, None, None, None, None, _Accelerator(), args, None, None)
        from lora2_train.objective import record_loss
        record_loss(net, 0.7)
        total = trainer.process_batch(*call)
        total_f, mse, reg, ent = trainer._last
        assert mse == pytest.approx(_TrainerBase().process_batch(*call).item(), rel=1e-5)
        r, w = net.reg_loss()
        # L_reg = L_ref·(rank term + β·weight term); L_ref = the mean data loss of the steps before (the one
        # recorded below), this batch's loss recorded after
        assert reg == pytest.approx(0.7 * (r + net.config.beta * w).item(), rel=1e-5)
        assert ent > 0 and total_f == pytest.approx(mse + 2 * reg + 0.1 * ent, rel=1e-5)
        # validation batches get sd-scripts' loss alone
        assert trainer.process_batch(*call[:-2], None, None, is_train=False).item() == pytest.approx(mse, rel=1e-5)
        total.backward()
        assert all(l.rho.grad is not None for l in net.layers.values())
        opt.step()
        lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("LORA2_PROGRESS")]
        e = parse_progress_line(lines[-1])
        assert (e.step, e.total) == (1, 2) and e.loss == pytest.approx(total_f)
        assert e.ranks == net.ranks() and e.resized and min(e.ranks.values()) < 8
        net.save_weights(str(tmp_path / "x.safetensors"), torch.float16, {})
        assert "LORA2_SAVED" in capsys.readouterr().out
    finally:
        net.close()


def test_trainer_extension_refuses_unsupported_options(tmp_path):
    from lora2_train.kohya.train import main, make_trainer_class

    trainer = make_trainer_class(_TrainerBase)()
    for ok in ("AdamW8bit", "Adafactor", "Prodigy", "Lion", "torch.optim.Adam"):
        trainer.assert_extra_args(_args(tmp_path, optimizer_type=ok), None, None)
    with pytest.raises(ConfigError, match="AdamWScheduleFree: .*cannot carry this optimizer's state; use AdamW"):
        trainer.assert_extra_args(_args(tmp_path, optimizer_type="AdamWScheduleFree"), None, None)
    with pytest.raises(ConfigError, match="lambda_e > 0 with --gradient_checkpointing"):
        trainer.assert_extra_args(_args(tmp_path, gradient_checkpointing=True), None, None)
    with pytest.raises(ConfigError, match="--network_module must be lora2_train.kohya.network"):
        trainer.assert_extra_args(_args(tmp_path, network_module="networks.lora"), None, None)
    with pytest.raises(ConfigError, match="unknown key 'rank'"):
        trainer.assert_extra_args(_args(tmp_path, network_args=["rank=4"]), None, None)
    assert main(["--sd_scripts", str(tmp_path)]) == 2


def test_no_reallocation_after_the_last_step_nor_at_save(tmp_path, small_unet, encoders):
    """The file holds exactly the adapter that gave the last loss."""
    net = make(small_unet, encoders, dim=8, r_max=16, resize_every=2, rank_block=1)
    try:
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        net.final_step = 4
        layer = next(iter(net.layers.values()))
        for step in range(4):
            opt.zero_grad()
            loss_of(small_unet, net, seed=step).backward()
            opt.step()
            if step == 2:
                layer.rho.data.fill_(layer._rho_for_rank(3))  # D(ν) = 3 from step 3 on
        assert net.steps == 4 and layer.rank == 8 and layer.target_rank() < 8  # no resize after step 4
        delta = layer.delta_weight()
        path = tmp_path / "last.safetensors"
        net.save_weights(str(path), torch.float32, {})
        assert layer.rank == 8  # saving re-allocates nothing
        saved = load_adapter(path).modules[layer.name]
        assert saved.rank == 8
        assert torch.allclose(saved.delta_weight(), delta, atol=1e-6)
    finally:
        net.close()


class _Wrapped(torch.nn.Module):
    """Stands for DistributedDataParallel around the network: accelerate saves and loads the wrapped state
    (keys ``module.…``), so the network's own load_state_dict is not the entry point."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_resume_through_a_wrapper_restores_ranks_and_steps_before_the_optimizer_state(small_unet, encoders):
    """sd-scripts' order on --resume: network created at r_init, optimizer built over its parameters, then
    accelerate's load_state: the (wrapped) network's state first, the optimizer's next."""
    net = make(small_unet, encoders, dim=8, r_max=16, resize_every=2, rank_block=1)
    fresh = make(small_unet, encoders, dim=8, r_max=16, resize_every=2, rank_block=1)
    try:
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        for step in range(3):
            if step == 1:  # ragged ranks, in place as sd-scripts' optimizer needs; its state follows
                for i, layer in enumerate(net.layers.values()):
                    layer.rho.data.fill_(layer._rho_for_rank([3, 8, 13, 1][i % 4]))
                    layer.resize([3, 8, 13, 1][i % 4], opt, in_place=True)
            opt.zero_grad()
            loss_of(small_unet, net, seed=step).backward()
            opt.step()
        assert net.steps == 3 and int(net.lora2_steps) == 3 and len(set(net.ranks().values())) > 1
        state, opt_state = _Wrapped(net).state_dict(), opt.state_dict()
        assert "module.lora2_steps" in state

        groups2, _ = fresh.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt2 = torch.optim.AdamW(groups2, lr=1e-3)
        params = [id(p) for p in fresh.parameters()]
        _Wrapped(fresh).load_state_dict(state)
        assert fresh.ranks() == net.ranks() and fresh.steps == 3
        opt2.load_state_dict(opt_state)
        assert [id(p) for p in fresh.parameters()] == params
        for k in net.layers:
            a, b = net.layers[k], fresh.layers[k]
            assert torch.equal(a.lora_down, b.lora_down) and torch.equal(a.rho, b.rho)
            assert torch.equal(opt.state[a.lora_up]["exp_avg_sq"], opt2.state[b.lora_up]["exp_avg_sq"])
        # the next step and the re-allocation after it (step 4) are the same on both
        net.close()  # the same U-Net: unpatch it, then patch it with the resumed network
        fresh.apply_to(encoders, small_unet)
        opt2.zero_grad()
        loss_of(small_unet, fresh, seed=3).backward()
        opt2.step()
        assert fresh.steps == 4
        # state from before the step count was kept still loads (count left as is)
        legacy = {k: v for k, v in fresh.state_dict().items() if k != "lora2_steps"}
        fresh.load_state_dict(legacy)
        assert fresh.steps == 4
    finally:
        fresh.close()
        net.close()


class _StateAccelerator(_Accelerator):
    """accelerate's Accelerator as the extension uses it on a stop: main process, save_state, barrier."""
    is_main_process = True

    def __init__(self):
        self.saved, self.barriers = [], 0

    def save_state(self, folder):
        import os
        os.makedirs(folder)
        with open(os.path.join(folder, "train_state.json"), "w") as f:  # sd-scripts' hook: its counter + 1
            json.dump({"current_epoch": 1, "current_step": 99}, f)
        self.saved.append(folder)

    def wait_for_everyone(self):
        self.barriers += 1


def test_stop_request_and_end_of_a_resumed_run_save_at_the_start_of_a_step(tmp_path, small_unet, encoders, capsys):
    from lora2_train.kohya.launch import STATE_PREFIX, parse_saved_line
    from lora2_train.kohya.train import make_trainer_class

    trainer = make_trainer_class(_TrainerBase)()
    args = _args(tmp_path, network_args=["resize_every=2"], max_train_steps=6, save_state_on_train_end=True,
                 save_state=False)
    net = make(small_unet, encoders, dim=8, resize_every=2)
    acc = _StateAccelerator()
    try:
        net.apply_to(encoders, small_unet)
        groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        opt = torch.optim.AdamW(groups, lr=1e-3)
        batch = unet_inputs(small_unet, batch=1)
        call = (batch, encoders, small_unet, net, None, None, None, None, acc, args, None, None)
        for _ in range(3):
            trainer.process_batch(*call).backward()
            opt.step()
            opt.zero_grad()
        trainer.stop_requested = True
        with pytest.raises(SystemExit) as info:
            trainer.process_batch(*call)
        assert info.value.code == 143 and acc.barriers == 1
        assert (tmp_path / "x-step00000003.safetensors").is_file()
        state = tmp_path / "x-step00000003-state"
        assert acc.saved == [str(state)]
        assert json.loads((state / "train_state.json").read_text())["current_step"] == 3  # the optimizer steps
        lines = capsys.readouterr().out.splitlines()
        assert parse_saved_line(next(l for l in lines if STATE_PREFIX in l), STATE_PREFIX)["step"] == 3
        # a resumed run that sd-scripts would carry past max_train_steps ends there with the final adapter
        trainer.stop_requested = False
        net.steps = 6
        with pytest.raises(SystemExit) as info:
            trainer.process_batch(*call)
        assert info.value.code == 0
        assert (tmp_path / "x.safetensors").is_file() and acc.saved[-1] == str(tmp_path / "x-state")
    finally:
        net.close()


def _run(net, unet, steps, start=0, resumed_from=None):
    """`net` trained from optimizer step `start` to `steps` (data from the step number); with
    `resumed_from` = (network state, optimizer state) loaded first, as sd-scripts' --resume does."""
    net.apply_to(None, unet)
    groups, _ = net.prepare_optimizer_params(None, 1e-2, 1e-2)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    if resumed_from is not None:
        _Wrapped(net).load_state_dict(resumed_from[0])
        opt.load_state_dict(resumed_from[1])
    grown = []
    net.step_listeners.append(lambda step, resized: grown.extend(k for k, (o, n) in resized.items() if n > o))
    for step in range(start, steps):
        opt.zero_grad()
        loss_of(unet, net, seed=step).backward()
        opt.step()
    return opt, grown


SEED_ARGS = dict(dim=8, r_max=16, r_target=8, beta=0.01, lambda_r=1.0, resize_every=2, rank_block=1, nu_lr=3.0)


def test_row_seed_comes_back_with_the_state_and_the_file(tmp_path, small_unet):
    """The rows of A grown after --resume are those of the uninterrupted run, and a file continues its run's
    seed (--network_weights, --dim_from_weights), whatever seed this process was given."""
    torch.manual_seed(11)  # sd-scripts: set_seed(args.seed) before the network is built
    ref = make(small_unet, [], **SEED_ARGS)
    try:
        assert ref.config.seed == 11 and {layer.seed for layer in ref.layers.values()} == {11}
        _, grown_ref = _run(ref, small_unet, 6)
        expected = {k: p.detach().clone() for k, p in ref.state_dict().items()}
    finally:
        ref.close()
    torch.manual_seed(11)
    cut = make(small_unet, [], **SEED_ARGS)
    try:
        opt, _ = _run(cut, small_unet, 3)
        state = {k: v.clone() for k, v in _Wrapped(cut).state_dict().items()}
        opt_state = opt.state_dict()
        path = tmp_path / "cut.safetensors"
        cut.save_weights(str(path), torch.float32, {})
        assert json.loads(load_adapter(path).metadata["lora2_config"])["seed"] == 11
    finally:
        cut.close()

    torch.manual_seed(99)  # the resumed process, seeded otherwise (sd-scripts without --seed)
    resumed = make(small_unet, [], **SEED_ARGS)
    try:
        assert resumed.config.seed == 99
        _, grown = _run(resumed, small_unet, 6, start=3, resumed_from=(state, opt_state))
        assert grown and set(grown) <= set(grown_ref)  # components grew after the resume
        got = resumed.state_dict()
        assert got.keys() == expected.keys()
        differ = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not differ, f"{len(differ)} of {len(expected)} tensors differ from the uninterrupted run's"
        assert int(state["module.lora2_seed"]) == 11
        assert resumed.config.seed == 11 and {layer.seed for layer in resumed.layers.values()} == {11}
        # state saved before the seed was kept still loads (the seed left as is)
        resumed.load_state_dict({k: v for k, v in got.items() if k != "lora2_seed"})
        assert resumed.config.seed == 11
    finally:
        resumed.close()

    torch.manual_seed(99)
    fresh = make(small_unet, [], **SEED_ARGS)
    try:
        fresh.load_weights(str(path))
        assert fresh.config.seed == int(fresh.lora2_seed) == 11 and {l.seed for l in fresh.layers.values()} == {11}
    finally:
        fresh.close()
    back, _ = kn.create_network_from_weights(1.0, str(path), None, [], small_unet)
    try:
        assert back.config.seed == int(back.lora2_seed) == 11 and {l.seed for l in back.layers.values()} == {11}
    finally:
        back.close()


def test_default_network_args_are_the_library_defaults_and_learn_ragged_ranks(small_unet):
    """No --network_args, no --network_dim: the network takes LoRA2Config()'s settings (those of the CLI, the node,
    the demo and the benchmarks) and, trained with the extension's objective, ends with ranks that differ."""
    import dataclasses

    from lora2_train.objective import lora2_loss

    net = kn.create_network(1.0, None, None, None, None, small_unet, neuron_dropout=None)
    defaults = LoRA2Config()
    for f in dataclasses.fields(LoRA2Config):
        if f.name not in ("seed", "extra"):
            assert getattr(net.config, f.name) == getattr(defaults, f.name), f.name
    net.apply_to(None, small_unet, apply_text_encoder=False, apply_unet=True)
    groups, _ = net.prepare_optimizer_params(None, 1e-3, 1e-3)  # sd-scripts' --learning_rate 1e-3
    from lora2_train.config import NU_LR_PER_LR

    assert groups[-1]["lr"] == pytest.approx(NU_LR_PER_LR * 1e-3)  # ρ's rate follows sd-scripts' unet_lr
    opt = torch.optim.Adam(groups)
    try:
        for step in range(100):
            x, t, ctx, y = unet_inputs(small_unet, batch=2, seed=step)
            loss = lora2_loss(small_unet(x, t, ctx, y).square().mean(), net, net.config)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if (step + 1) % net.config.resize_every == 0:
                net.resize(opt)
        ranks = set(net.ranks().values())
        assert len(ranks) > 1, ranks
    finally:
        net.restore()
