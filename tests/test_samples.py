"""Samples while training: sd-scripts prompt lines parsed for the embedded backend, and the trainer's sampling
hook, which must leave the run bit-identical to one without it."""
import pytest
import torch

from lora2_train.sample_prompts import COMFY_SAMPLERS, SamplePrompt, parse_line, parse_prompts
from lora2_train.trainer import Trainer

from test_trainer import _state, examples, setup


# ---- prompt lines --------------------------------------------------------------------------------------------
def test_prompt_options_and_defaults():
    got = parse_prompts("# a comment\n\na sks dog on a beach --w 640 --h 770 --s 20 --l 6.5 --d 42 --n blurry, "
                        "low res\n  a sks dog --N ugly --SS dpmsolver++ --d 3\nplain prompt",
                        width=512, height=512, steps=12, cfg=5.0, seed=7, sampler="euler_a")
    assert got == [
        SamplePrompt("a sks dog on a beach", "blurry, low res", 640, 768, 20, 6.5, 42, "euler_a"),
        SamplePrompt("a sks dog", "ugly", 512, 512, 12, 5.0, 3, "dpmsolver++"),
        SamplePrompt("plain prompt", "", 512, 512, 12, 5.0, 7, "euler_a"),
    ]
    assert got[1].comfy_sampler == "dpmpp_2m" and got[0].comfy_sampler == "euler_ancestral"
    assert parse_line("x --n").negative == ""  # an empty negative prompt


@pytest.mark.parametrize("line, message", [
    ("a dog --x 3", r"sample_prompts line 1: unknown option --x \(supported: --w --h --s --l --d --n --ss\)"),
    ("a dog --w wide", r"line 1: option --w needs a whole number, got 'wide'"),
    ("a dog --h 32", r"option --h must be at least 64, got '32'"),
    ("a dog --s 0", r"option --s must be at least 1"),
    ("a dog --l nan", r"option --l must be at least 0"),
    ("a dog --l", r"option --l needs a value"),
    ("a dog --d -1", r"option --d must be at least 0"),
    ("a dog --ss plms", r"option --ss must be one of .*got 'plms'"),
    ("--w 64", r"line 1: no prompt before the options"),
])
def test_bad_options_are_one_line_errors_naming_the_option(line, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_line(line)
    assert "\n" not in str(e.value)


def test_no_prompt_and_bad_sampler():
    with pytest.raises(ValueError, match="sample_prompts: no prompt"):
        parse_prompts("\n# only a comment\n")
    with pytest.raises(ValueError, match="line 2: unknown option --q"):
        parse_prompts("ok\nbad --q 1")
    with pytest.raises(ValueError, match="sample_sampler must be one of"):
        parse_prompts("ok", sampler="plms")


def test_every_node_sampler_has_a_comfyui_sampler():
    from lora2_train.kohya.launch import SAMPLERS

    assert set(COMFY_SAMPLERS) == set(SAMPLERS)
    assert COMFY_SAMPLERS["k_dpm_2_a"] == "dpm_2_ancestral" and COMFY_SAMPLERS["euler_a"] == "euler_ancestral"


# ---- the trainer's sampling hook -----------------------------------------------------------------------------
def _run(hook=None, sample_every=0, should_stop=None, **kw):
    unet, net, _, cfg = setup(steps=5, lambda_e=0.5, entropy_queries=4, gradient_checkpointing=True, **kw)
    data = examples(4)
    trainer = Trainer(unet, net, data, cfg, entropy_root=unet, should_stop=should_stop,
                      on_sample=(lambda step: hook(step, unet, trainer)) if hook else None, sample_every=sample_every)
    res = trainer.train()
    return res, _state(net), trainer, torch.get_rng_state()


def test_sampling_hook_runs_at_its_steps_and_leaves_training_bit_identical():
    seen = []

    def hook(step, unet, trainer):
        before = len(trainer.entropy.values), trainer.entropy.generator.get_state()
        g = torch.randn(2, 4, 8, 8)  # the hook draws from the global generator, as ComfyUI's prepare_noise does
        torch.manual_seed(1234)  # and reseeds it
        out = unet(g + torch.rand(1), torch.randint(0, 1000, (2,)), torch.randn(2, 6, 32), torch.randn(2, 64))
        seen.append({"step": step, "grad": torch.is_grad_enabled(), "requires_grad": out.requires_grad,
                     "ckpt": unet.gradient_checkpointing, "finite": bool(out.isfinite().all()),
                     "entropy_kept": before[0] == len(trainer.entropy.values)
                     and torch.equal(before[1], trainer.entropy.generator.get_state())})

    torch.manual_seed(99)
    plain, plain_state, plain_trainer, plain_rng = _run()
    torch.manual_seed(99)
    sampled, sampled_state, sampled_trainer, sampled_rng = _run(hook, sample_every=2)
    assert [s["step"] for s in seen] == [2, 4]
    assert all(not s["grad"] and not s["requires_grad"] and not s["ckpt"] and s["finite"] and s["entropy_kept"]
               for s in seen), seen
    assert sampled_trainer.model.gradient_checkpointing  # switched back on after each sample
    assert plain.ranks == sampled.ranks and plain.last.loss == sampled.last.loss
    assert plain_state.keys() == sampled_state.keys()
    for k in plain_state:
        assert torch.equal(plain_state[k], sampled_state[k]), k
    assert torch.equal(plain_rng, sampled_rng)
    assert torch.equal(plain_trainer.generator.get_state(), sampled_trainer.generator.get_state())
    assert torch.equal(plain_trainer.entropy.generator.get_state(), sampled_trainer.entropy.generator.get_state())
    assert [h["ranks"] for h in plain.history] == [h["ranks"] for h in sampled.history]


def test_no_sample_after_a_cancel_and_every_step_when_asked():
    """Cancel pressed during the optimizer step of step 2: that step draws no sample, and the run stops."""
    unet, net, _, cfg = setup(steps=5)
    calls, cancelled = [], []
    trainer = Trainer(unet, net, examples(), cfg, on_sample=calls.append, sample_every=1,
                      should_stop=lambda: bool(cancelled))
    step = trainer._optimizer_step

    def optimizer_step():
        out = step()
        if trainer.step == 1:  # the step being taken is step 2
            cancelled.append(True)
        return out

    trainer._optimizer_step = optimizer_step
    res = trainer.train()
    assert res.stopped and res.steps == 2 and calls == [1]


def test_sample_every_must_be_a_non_negative_integer():
    unet, net, _, cfg = setup(steps=2)
    with pytest.raises(ValueError, match="sample_every must be a non-negative integer"):
        Trainer(unet, net, examples(), cfg, on_sample=print, sample_every=-1)
