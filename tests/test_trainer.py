import pytest
import torch

from lora2_train.config import LoRA2Config
from lora2_train.models import SDXLUNet, koala_700m_config, reduced
from lora2_train.network import LoRA2Network
from lora2_train.planted import RandomConditioning, make_teacher, plan_ranks, target_modules
from lora2_train.trainer import SampledDataset, Trainer, TrainingDiverged


def setup(steps=6, seed=0, **kw):
    torch.manual_seed(seed)
    unet = SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8)).requires_grad_(False)
    base = dict(r_init=4, r_target=4, r_max=16, lr=1e-3, nu_lr=1e-2, steps=steps, resize_every=2,
                checkpoint_every=3, batch_size=2)
    base.update(kw)
    cfg = LoRA2Config(**base)
    net = LoRA2Network(cfg, unet).apply_to()
    data = RandomConditioning(4, 8, 32, 64, tokens=6)
    return unet, net, data, cfg


def examples(n=3, nan_at=None):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        lat = torch.randn(4, 8, 8, generator=g)
        if nan_at is not None and i == nan_at:
            lat[0, 0, 0] = float("nan")
        out.append({"latents": lat, "cond": {"context": torch.randn(6, 32, generator=g), "y": torch.randn(64, generator=g)}})
    return out


def test_epsilon_training_reports_every_step_and_logs_ranks():
    unet, net, _, cfg = setup(steps=6, lambda_e=0.1)
    events = []
    res = Trainer(unet, net, examples(), cfg, callback=events.append, entropy_root=unet).train()
    assert [e.step for e in events] == list(range(1, 7))
    e = events[-1]
    assert e.entropy > 0
    assert e.loss == pytest.approx(e.mse + cfg.lambda_r * e.reg + cfg.lambda_e * e.entropy, rel=1e-4)
    assert set(e.ranks) == set(net.layers) and e.num_params == net.num_parameters()
    assert [h["step"] for h in res.history] == [0, 2, 4, 6]
    assert res.steps == 6 and not res.stopped


def test_ranks_grow_and_shrink_during_training_and_training_goes_on():
    unet, net, data, cfg = setup(steps=8, nu_lr=0.5, lambda_r=0.0, r_init=4, r_max=16)
    res = Trainer(unet, net, data, cfg).train()
    assert any(r != 4 for r in res.ranks.values())
    for k, layer in net.layers.items():
        assert layer.lora_down.shape[0] == res.ranks[k] == layer.lora_up.shape[1]
    assert torch.isfinite(torch.tensor(res.last.loss))


def test_regularizer_pulls_ranks_to_target():
    unet, net, data, cfg = setup(steps=20, r_init=12, r_target=4, lambda_r=10.0, nu_lr=0.2, resize_every=5)
    res = Trainer(unet, net, data, cfg).train()
    assert all(r <= 8 for r in res.ranks.values())


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_checkpoint_resume_is_exact(tmp_path):
    unet, net, data, cfg = setup(steps=6, nu_lr=0.3)
    Trainer(unet, net, data, cfg).train()
    straight = _state(net)

    unet, net, data, cfg = setup(steps=6, nu_lr=0.3)
    calls = iter(range(100))
    t = Trainer(unet, net, data, cfg, out_dir=tmp_path, should_stop=lambda: next(calls) >= 3)
    res = t.train()
    assert res.stopped and res.steps == 3 and (tmp_path / "checkpoint.pt").exists()

    unet, net, data, cfg = setup(steps=6, nu_lr=0.3)
    res = Trainer(unet, net, data, cfg, out_dir=tmp_path).train(resume_from=tmp_path / "checkpoint.pt")
    assert res.steps == 6
    resumed = _state(net)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert straight[k].shape == resumed[k].shape, k
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    """The GradScaler (enabled for fp16 on CUDA) resumes at its saved scale and growth count, not at its
    initial 2^16; here a CPU scaler stands in for the CUDA one."""
    unet, net, data, cfg = setup(steps=3, checkpoint_every=3)
    t = Trainer(unet, net, data, cfg, out_dir=tmp_path)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    t.train()
    saved = t.scaler.state_dict()
    assert saved["scale"] == 2.0 ** 11 and saved["_growth_tracker"] == 1  # grew once after 2 good steps
    unet, net, data, cfg = setup(steps=4)
    t2 = Trainer(unet, net, data, cfg, out_dir=tmp_path)
    t2.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    t2.load_checkpoint(tmp_path / "checkpoint.pt")
    assert t2.scaler.state_dict() == saved and t2.step == 3
    t2.train()
    assert t2.scaler.get_scale() == 2.0 ** 12  # the saved growth count carried: one more good step grows it


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    unet, net, _, cfg = setup(steps=50, checkpoint_every=2, batch_size=1)
    data = SampledDataset(examples(n=1))
    t = Trainer(unet, net, data, cfg, out_dir=tmp_path)
    poisoned = examples(n=1, nan_at=0)
    orig = data.sample

    def sample(bs, g):
        return orig(bs, g) if t.step < 4 else SampledDataset(poisoned).sample(bs, g)
    data.sample = sample
    with pytest.raises(TrainingDiverged, match=r"step 5.*last good checkpoint"):
        t.train()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["network"].values())


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    unet, net, data, cfg = setup(steps=10, checkpoint_every=100)

    def interrupt(e):
        if e.step == 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        Trainer(unet, net, data, cfg, out_dir=tmp_path, callback=interrupt).train()
    unet, net, data, cfg = setup(steps=10, checkpoint_every=100)
    t = Trainer(unet, net, data, cfg, out_dir=tmp_path)
    t.load_checkpoint(tmp_path / "checkpoint.pt")
    assert t.step == 4
    assert t.train().steps == 10


def test_resume_refuses_other_config_and_garbage(tmp_path):
    unet, net, data, cfg = setup(steps=3)
    Trainer(unet, net, data, cfg, out_dir=tmp_path).train()
    unet, net, data, cfg = setup(steps=3, q=0.8)
    with pytest.raises(ValueError, match="'q'"):
        Trainer(unet, net, data, cfg).load_checkpoint(tmp_path / "checkpoint.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        Trainer(unet, net, data, cfg).load_checkpoint(bad)


def test_empty_dataset_is_a_clear_error():
    unet, net, _, cfg = setup()
    with pytest.raises(ValueError, match="dataset is empty"):
        Trainer(unet, net, [], cfg)


def test_gradient_checkpointing_gives_the_same_step():
    losses = []
    for gc in (False, True):
        unet, net, data, cfg = setup(steps=2, gradient_checkpointing=gc, lambda_e=0.5)
        res = Trainer(unet, net, data, cfg, entropy_root=unet).train()
        losses.append((res.last.loss, _state(net)))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    for k in losses[0][1]:
        assert torch.allclose(losses[0][1][k], losses[1][1][k], atol=1e-6)


def test_bf16_autocast_runs():
    unet, net, data, cfg = setup(steps=2, mixed_precision="bf16")
    res = Trainer(unet, net, data, cfg).train()
    assert torch.isfinite(torch.tensor(res.last.mse))


def test_distillation_reduces_teacher_mismatch():
    torch.manual_seed(0)
    unet = SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8)).requires_grad_(False)
    teacher = make_teacher(unet, plan_ranks(target_modules(unet)), strength=3.0)
    cfg = LoRA2Config(r_init=8, r_target=8, r_max=16, lr=3e-3, nu_lr=1e-2, lambda_r=1e-3, steps=60, batch_size=4,
                      resize_every=10)
    net = LoRA2Network(cfg, unet).apply_to()
    data = RandomConditioning(4, 8, 32, 64, tokens=6)
    g = torch.Generator().manual_seed(123)
    probe = data.sample(8, g)
    t = torch.randint(0, 1000, (8,), generator=g)

    def mismatch():
        with torch.no_grad():
            return float((unet(probe["latents"], t, **probe["cond"]) - teacher(probe["latents"], t, **probe["cond"])).square().mean())
    before = mismatch()
    Trainer(unet, net, data, cfg, teacher=teacher).train()
    assert mismatch() < 0.8 * before


def test_no_reallocation_after_the_last_step():
    """The adapter a run ends with is the one that gave the last loss: no resize after the last step."""
    unet, net, data, cfg = setup(steps=4, resize_every=2, nu_lr=0.5, lambda_r=10.0, r_init=8, r_target=1)
    calls, trainer = [], None
    resize = net.resize

    def counting(*a, **kw):
        calls.append(trainer.step)
        return resize(*a, **kw)

    net.resize = counting
    trainer = Trainer(unet, net, data, cfg)
    res = trainer.train()
    assert calls == [2]
    assert [h["step"] for h in res.history] == [0, 2, 4]
    assert any(l.target_rank() != l.rank for l in net.layers.values())  # ν moved on after the last resize
    assert res.ranks == {k: l.rank for k, l in net.layers.items()}


def test_entropy_hooks_are_removed_on_every_exit():
    unet, net, data, cfg = setup(steps=4, lambda_e=0.1)

    def hooked():
        return sum(len(m._forward_hooks) for n, m in unet.named_modules() if ".attn2.to_" in n)

    def boom(_event):
        raise RuntimeError("out of memory")

    trainer = Trainer(unet, net, data, cfg, callback=boom, entropy_root=unet)
    assert hooked() > 0
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train()
    assert hooked() == 0
    trainer = Trainer(unet, net, data, cfg, should_stop=lambda: True, entropy_root=unet)
    assert trainer.train().stopped and hooked() == 0


def test_entropy_query_subset_is_the_same_under_checkpointing_and_leaves_the_data_stream_alone():
    results = []
    for gc, lambda_e in ((False, 0.5), (True, 0.5), (False, 0.0)):
        unet, net, data, cfg = setup(steps=3, gradient_checkpointing=gc, lambda_e=lambda_e, entropy_queries=4)
        trainer = Trainer(unet, net, data, cfg, entropy_root=unet)
        res = trainer.train()
        results.append((res.last.loss, _state(net), trainer.generator.get_state()))
    (loss0, state0, rng0), (loss1, state1, rng1), (_, _, rng2) = results
    assert loss0 == pytest.approx(loss1, rel=1e-5)  # the recomputed blocks saw the same queries
    for k in state0:
        assert torch.allclose(state0[k], state1[k], atol=1e-6), k
    assert torch.equal(rng0, rng2)  # the entropy subsets do not advance the data/noise stream
