"""Training controls of the embedded trainer: gradient accumulation, clipping, lr schedules, min-SNR,
v-prediction, zero terminal SNR, noise offset, pseudo-Huber loss, snapshots."""
import math

import pytest
import torch

from lora2_train.config import ConfigError, LoRA2Config
from lora2_train.lr_schedule import lr_multiplier
from lora2_train.objective import DDPMSchedule, diffusion_loss, min_snr_weights, rescale_zero_terminal_snr
from lora2_train.trainer import Trainer

from test_trainer import _state, examples, setup


def _recording(trainer):
    """Record (lr per group, gradient norm) at every optimizer.step call."""
    seen = []
    step = trainer.optimizer.step

    def recording(*a, **kw):
        grads = [p.grad for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        seen.append(([g["lr"] for g in trainer.optimizer.param_groups], norm))
        return step(*a, **kw)

    trainer.optimizer.step = recording
    return seen


# ---- gradient accumulation ---------------------------------------------------------------------
def test_accumulating_k_micro_batches_equals_one_k_times_batch_step():
    runs = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        unet, net, _, cfg = setup(steps=3, batch_size=batch, gradient_accumulation_steps=accum, lambda_e=0.1,
                                  entropy_queries=4, min_snr_gamma=5.0, noise_offset=0.1, resize_every=2,
                                  nu_lr=0.3)
        events, grads = [], []
        t = Trainer(unet, net, examples(5), cfg, callback=events.append, entropy_root=unet)
        step = t.optimizer.step
        t.optimizer.step = lambda: (grads.append([p.grad.clone() for g in t.optimizer.param_groups
                                                  for p in g["params"]]), step())[1]
        t.train()
        runs.append((events, _state(net), grads[0]))
    (ev0, s0, g0) = runs[0]
    scale = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in g0])))
    for events, state, grads in runs[1:]:
        # the gradient of the first optimizer step (after clipping) is the same up to float rounding
        assert max(float((a - b).abs().max()) for a, b in zip(g0, grads)) <= 1e-5 * scale
        assert [e.step for e in events] == [1, 2, 3]  # steps count optimizer steps
        for a, b in zip(ev0, events):
            assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.entropy == pytest.approx(a.entropy, rel=1e-5)
            assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
            assert b.ranks == a.ranks  # resizes happen on optimizer steps, not micro-steps
        for k in s0:
            # Adam divides by √v: entries whose gradient is ~0 amplify rounding; 3 steps of lr 1e-3 move ~3e-3
            assert torch.allclose(s0[k], state[k], rtol=1e-4, atol=5e-5), (k, float((s0[k] - state[k]).abs().max()))


# ---- clipping ------------------------------------------------------------------------------------
def test_gradient_norm_is_clipped_at_max_grad_norm_and_not_when_off():
    norms = {}
    for max_norm in (1e-4, 0.0):
        unet, net, _, cfg = setup(steps=2, max_grad_norm=max_norm)
        t = Trainer(unet, net, examples(), cfg, callback=lambda e: events.append(e))
        events = []
        seen = _recording(t)
        t.train()
        norms[max_norm] = ([n for _, n in seen], [e.grad_norm for e in events])
    clipped, reported = norms[1e-4]
    assert all(n <= 1e-4 * (1 + 1e-4) for n in clipped)
    assert all(r > 1e-3 for r in reported)  # the norm before clipping is reported
    unclipped, off = norms[0.0]
    assert unclipped[0] == pytest.approx(reported[0], rel=1e-4)  # the same first step, not clipped
    assert all(math.isnan(r) for r in off)


# ---- learning-rate schedules -------------------------------------------------------------------
def test_schedule_values_by_hand():
    assert [lr_multiplier("constant", s, 3, 6) for s in range(6)] == [1.0] * 6
    assert [lr_multiplier("constant_with_warmup", s, 4, 6) for s in range(6)] == [0, .25, .5, .75, 1, 1]
    cos = [lr_multiplier("cosine", s, 2, 6) for s in range(6)]
    assert cos == pytest.approx([0.0, 0.5, 1.0, 0.8535533905932737, 0.5, 0.1464466094067262])
    assert [lr_multiplier("cosine", s, 0, 4) for s in range(4)] == pytest.approx(
        [1.0, 0.8535533905932737, 0.5, 0.1464466094067262])
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_multiplier("linear", 0, 0, 1)


@pytest.mark.parametrize("name,warmup", [("constant", 0), ("constant_with_warmup", 2), ("cosine", 1)])
def test_trainer_sets_each_groups_lr_by_optimizer_step(name, warmup):
    unet, net, _, cfg = setup(steps=4, lr=1e-3, nu_lr=1e-2, lr_scheduler=name, lr_warmup_steps=warmup,
                              gradient_accumulation_steps=2)
    t = Trainer(unet, net, examples(), cfg)
    seen = _recording(t)
    t.train()
    assert len(seen) == 4  # one optimizer step per step, whatever the accumulation
    for s, (lrs, _) in enumerate(seen):
        m = lr_multiplier(name, s, warmup, 4)
        assert lrs == pytest.approx([1e-3 * m, 1e-2 * m])


# ---- min-SNR, v-prediction, zero terminal SNR, noise offset, Huber ------------------------------
def test_min_snr_weights_by_hand():
    s = DDPMSchedule(num_timesteps=3)
    s.alphas_cumprod = torch.tensor([0.8, 0.5, 0.0])  # SNR 4, 1, 0
    snr = s.snr(torch.tensor([0, 1, 2]))
    assert snr.tolist() == pytest.approx([4.0, 1.0, 0.0])
    assert min_snr_weights(snr, 5.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert min_snr_weights(snr, 2.0).tolist() == pytest.approx([0.5, 1.0, 1.0])  # min(4,2)/4, min(1,2)/1
    assert min_snr_weights(snr, 2.0, "v_prediction").tolist() == pytest.approx([0.4, 0.5, 0.0])  # /(SNR+1)
    # the weighted loss: mean over samples of w_i · mean((pred_i − target_i)²)
    pred, target = torch.zeros(2, 1, 2), torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])
    w = torch.tensor([0.5, 1.0])
    assert float(diffusion_loss(pred, target, weights=w)) == pytest.approx((0.5 * 5.0 + 1.0 * 4.0) / 2)


def test_v_prediction_target_by_hand_and_in_the_trainer():
    s = DDPMSchedule(num_timesteps=2)
    s.alphas_cumprod = torch.tensor([0.36, 0.64])
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.ones(1, 1, 1, 1)
    assert float(s.v_target(x0, eps, torch.tensor([0]))) == pytest.approx(0.6 * 1 - 0.8 * 2)  # √ᾱ·ε − √(1−ᾱ)·x0
    assert float(s.v_target(x0, eps, torch.tensor([1]))) == pytest.approx(0.8 * 1 - 0.6 * 2)
    for prediction in ("epsilon", "v_prediction"):
        unet, net, _, cfg = setup(prediction_type=prediction, batch_size=2)
        t = Trainer(unet, net, examples(), cfg)
        x0, x_t, ts, noise, cond = t._draw()
        with torch.no_grad():
            pred = unet(x_t, ts, **cond)
            a = t.schedule.alphas_cumprod[ts].view(-1, 1, 1, 1)
            target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction == "v_prediction" else noise
            _, mse, _, _ = t._losses(x0, x_t, ts, noise, cond)
        assert float(mse) == pytest.approx(float((pred - target).square().mean()), rel=1e-5)


def test_zero_terminal_snr_rescales_the_betas():
    # β = (0.1, 0.2, 0.3)² → ᾱ = 0.99, 0.9504, 0.864864; √ᾱ shifted to end at 0 and scaled to keep ᾱ_0
    s = DDPMSchedule(num_timesteps=3, beta_start=0.01, beta_end=0.09, zero_terminal_snr=True)
    assert s.alphas_cumprod.tolist() == pytest.approx([0.99, 0.47237518769328835, 0.0], abs=1e-7)
    sdxl = DDPMSchedule(zero_terminal_snr=True)
    assert float(sdxl.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-6)
    assert float(sdxl.alphas_cumprod[-1]) == 0.0 and float(sdxl.snr(torch.tensor([999]))) == 0.0
    assert bool((sdxl.alphas_cumprod[1:] < sdxl.alphas_cumprod[:-1]).all())
    assert torch.allclose(rescale_zero_terminal_snr(DDPMSchedule().alphas_cumprod), sdxl.alphas_cumprod, atol=1e-7)
    unet, net, _, cfg = setup(zero_terminal_snr=True, prediction_type="v_prediction")
    assert float(Trainer(unet, net, examples(), cfg).schedule.alphas_cumprod[-1]) == 0.0


def test_noise_offset_adds_a_per_channel_constant_and_leaves_the_stream_alone_when_zero():
    s = DDPMSchedule()
    x0 = torch.zeros(64, 4, 8, 8)
    plain_noise = s.noisy(x0, torch.Generator().manual_seed(3))[2]
    again = s.noisy(x0, torch.Generator().manual_seed(3), noise_offset=0.0)[2]
    assert torch.equal(plain_noise, again)
    shifted = s.noisy(x0, torch.Generator().manual_seed(3), noise_offset=0.5)[2]
    diff = shifted - plain_noise
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)  # constant over the image
    assert float(diff[:, :, 0, 0].std()) == pytest.approx(0.5, rel=0.2)


def test_pseudo_huber_loss_by_hand():
    pred, target = torch.tensor([[3.0]]), torch.tensor([[0.0]])
    assert float(diffusion_loss(pred, target, "huber", 1.0)) == pytest.approx(2 * (math.sqrt(10) - 1))
    small = torch.tensor([[1e-3]])
    assert float(diffusion_loss(small, torch.zeros(1, 1), "huber", 0.1)) == pytest.approx(1e-6, rel=1e-3)
    unet, net, _, cfg = setup(steps=2, loss_type="huber", huber_c=0.05)
    res = Trainer(unet, net, examples(), cfg).train()
    assert math.isfinite(res.last.mse) and res.last.mse < 0.5  # ≈ 2c|d| for unit-size errors


def test_new_fields_are_validated_with_the_field_named():
    for kw, field in [({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
                      ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"lr_scheduler": "linear"}, "lr_scheduler"),
                      ({"lr_warmup_steps": -1}, "lr_warmup_steps"), ({"min_snr_gamma": float("nan")}, "min_snr_gamma"),
                      ({"loss_type": "l1"}, "loss_type"), ({"huber_c": 0.0}, "huber_c"),
                      ({"prediction_type": "sample"}, "prediction_type"),
                      ({"zero_terminal_snr": "yes"}, "zero_terminal_snr"), ({"save_every_n_steps": -2}, "save_every_n_steps"),
                      ({"noise_offset": -0.1}, "noise_offset")]:
        with pytest.raises(ConfigError, match=f"LoRA2Config.{field} "):
            LoRA2Config(**kw)


# ---- snapshots -----------------------------------------------------------------------------------
def test_snapshots_every_n_steps_before_reallocation_never_at_the_last_step():
    unet, net, data, cfg = setup(steps=5, resize_every=2, save_every_n_steps=2)
    order, trainer = [], None
    resize = net.resize
    net.resize = lambda *a, **kw: (order.append(("resize", trainer.step)), resize(*a, **kw))[1]
    trainer = Trainer(unet, net, data, cfg, on_save=lambda k: order.append(("save", k)))
    trainer.train()
    # the snapshot is the adapter that gave step k's loss: saved before step k's re-allocation
    assert order == [("save", 2), ("resize", 2), ("save", 4), ("resize", 4)]
    unet, net, data, cfg = setup(steps=4, save_every_n_steps=2)
    seen = []
    Trainer(unet, net, data, cfg, on_save=seen.append).train()
    assert seen == [2]  # step 4 is the run's own file


# ---- Cancel → resume ------------------------------------------------------------------------------
def test_cancel_and_resume_keeps_the_schedule_data_and_accumulation_position(tmp_path):
    """A cosine run with warm-up, gradient accumulation, min-SNR, noise offset and the entropy term, stopped
    at step 3 and resumed from its checkpoint, takes the same learning rates at every step and ends with the
    same weights as the run that was never stopped."""
    kw = dict(steps=6, lr_scheduler="cosine", lr_warmup_steps=2, gradient_accumulation_steps=2, batch_size=1,
              nu_lr=0.3, resize_every=2, lambda_e=0.1, entropy_queries=4, min_snr_gamma=5.0, noise_offset=0.1,
              checkpoint_every=100)

    def run(out_dir=None, stop_at=None, resume=None):
        unet, net, _, cfg = setup(**kw)
        calls = iter(range(100))
        stop = (lambda: next(calls) >= stop_at) if stop_at is not None else None
        events = []
        t = Trainer(unet, net, examples(5), cfg, out_dir=out_dir, should_stop=stop, callback=events.append,
                    entropy_root=unet)
        seen = _recording(t)
        if resume is not None:  # the optimizer is rebuilt on load: record on the rebuilt one
            t.load_checkpoint(resume)
            seen = _recording(t)
        res = t.train()
        return res, net, [lrs for lrs, _ in seen], events

    res, net, lrs, events = run()
    straight, straight_lrs, straight_losses = _state(net), lrs, [e.loss for e in events]
    assert straight_lrs[0] == [0.0, 0.0] and straight_lrs[2] == pytest.approx([1e-3, 0.3])  # warm-up, then peak

    res, _, first_lrs, first_events = run(tmp_path, stop_at=3)
    assert res.stopped and res.steps == 3 and (tmp_path / "checkpoint.pt").exists()
    res, net, rest_lrs, rest_events = run(tmp_path, resume=tmp_path / "checkpoint.pt")
    assert res.steps == 6 and not res.stopped
    assert first_lrs + rest_lrs == straight_lrs
    assert [e.loss for e in first_events + rest_events] == pytest.approx(straight_losses, rel=1e-6)
    resumed = _state(net)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert straight[k].shape == resumed[k].shape, k
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), (k, float((straight[k] - resumed[k]).abs().max()))


# ---- text-encoder learning rate ------------------------------------------------------------------
class _WithTextEncoder(torch.nn.Module):
    """A U-Net whose context comes from a text encoder run in the step, so text-encoder LoRAs get gradients."""

    def __init__(self, unet, te):
        super().__init__()
        self.unet, self.te = unet, te

    def forward(self, x_t, t, input_ids, y):
        return self.unet(x_t, t, context=self.te(input_ids=input_ids).last_hidden_state, y=y)


def test_text_encoder_loras_get_their_own_scheduled_learning_rate():
    from lora2_train.models import SDXLUNet, koala_700m_config, reduced
    from lora2_train.network import LoRA2Network
    from tests_helpers import tiny_clip_text_model

    g = torch.Generator().manual_seed(2)
    data = [{"latents": torch.randn(4, 8, 8, generator=g),
             "cond": {"input_ids": torch.randint(0, 100, (6,), generator=g), "y": torch.randn(64, generator=g)}}
            for _ in range(3)]
    for te_lr, expected in ((5e-4, 5e-4), (0.0, 1e-3)):  # 0: the LoRA learning rate
        torch.manual_seed(0)
        unet = SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8))
        te = tiny_clip_text_model()
        unet.requires_grad_(False), te.requires_grad_(False)
        cfg = LoRA2Config(r_init=4, r_target=4, r_max=16, lr=1e-3, nu_lr=1e-2, steps=3, resize_every=2,
                          targets=("attn1", "attn2", "te_attn"), text_encoder_lr=te_lr, lr_scheduler="cosine",
                          lr_warmup_steps=1, weight_decay=0.01)
        net = LoRA2Network(cfg, unet, [te]).apply_to()
        groups = net.param_groups()
        assert [gr["name"] for gr in groups] == ["lora", "lora_te", "nu"]
        assert [gr["lr"] for gr in groups] == [1e-3, expected, 1e-2]
        te_params = {id(p) for k, l in net.layers.items() if k.startswith("lora_te1_") for p in (l.lora_down, l.lora_up)}
        assert {id(p) for p in groups[1]["params"]} == te_params and len(te_params) == 2 * 4 * 2
        assert not te_params & {id(p) for p in groups[0]["params"]}
        before = {k: l.lora_up.detach().clone() for k, l in net.layers.items() if k.startswith("lora_te1_")}
        t = Trainer(_WithTextEncoder(unet, te), net, data, cfg)
        assert [gr["weight_decay"] for gr in t.optimizer.param_groups] == [0.01, 0.01, 0.0]
        seen = _recording(t)
        t.train()
        for s, (lrs, _) in enumerate(seen):  # scheduled like the others
            m = lr_multiplier("cosine", s, 1, 3)
            assert lrs == pytest.approx([1e-3 * m, expected * m, 1e-2 * m])
        # the text-encoder LoRAs trained (B starts at 0; it moved)
        assert all(float(net.layers[k].lora_up.detach().abs().max()) > 0 for k in before)
    # a U-Net-only network keeps its two groups
    unet, net, _, cfg = setup(text_encoder_lr=5e-4)
    assert [gr["name"] for gr in net.param_groups()] == ["lora", "nu"]
    with pytest.raises(ConfigError, match="LoRA2Config.text_encoder_lr "):
        LoRA2Config(text_encoder_lr=-1e-4)
