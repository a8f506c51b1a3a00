import math

import pytest
import torch

from lora2_train.config import LoRA2Config
from lora2_train.network import LoRA2Network
from lora2_train.objective import CrossAttentionEntropy, DDPMSchedule, attention_entropy

from tests_helpers import unet_inputs


def test_ddpm_schedule_sdxl_values():
    s = DDPMSchedule()
    # scaled_linear: β_0 = 0.00085, ᾱ_0 = 1 − β_0; ᾱ_999 ≈ 0.00466 (SDXL)
    assert float(s.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-6)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.0047, abs=2e-4)
    x0, noise = torch.ones(1, 1), torch.zeros(1, 1)
    t = torch.tensor([0])
    assert float(s.add_noise(x0, noise, t)) == pytest.approx(math.sqrt(1 - 0.00085), rel=1e-6)


def test_attention_entropy_hand_values():
    # identical keys → uniform attention over N tokens → entropy ln N
    q = torch.randn(2, 5, 8)
    k = torch.ones(2, 7, 8)
    assert float(attention_entropy(q, k, heads=2)) == pytest.approx(math.log(7), rel=1e-5)
    # one key dominating → entropy ≈ 0
    k2 = torch.zeros(1, 4, 4)
    k2[0, 0] = 100.0
    q2 = torch.ones(1, 3, 4)
    assert float(attention_entropy(q2, k2, heads=1)) < 1e-6


def test_cross_attention_entropy_hooks_all_attn2_and_subsample(tiny_koala):
    coll = CrossAttentionEntropy(tiny_koala, queries=4)
    try:
        assert coll.num_layers == 21
        with torch.no_grad():
            tiny_koala(*unet_inputs(tiny_koala, tokens=8))
        assert len(coll.values) == 21
        h = float(coll.loss())
        assert 0 < h <= math.log(8) + 1e-5
        coll.reset()
        assert float(coll.loss()) == 0.0
    finally:
        coll.remove()
    with torch.no_grad():
        tiny_koala(*unet_inputs(tiny_koala))
    assert coll.values == []


def test_entropy_gradient_reaches_lora_of_cross_attention(tiny_koala):
    net = LoRA2Network(LoRA2Config(r_init=4, r_target=4, r_max=8), tiny_koala).apply_to()
    coll = CrossAttentionEntropy(tiny_koala, queries=8)
    try:
        with torch.no_grad():
            for l in net.layers.values():
                l.lora_up.normal_(std=0.1)
        tiny_koala(*unet_inputs(tiny_koala))
        coll.loss().backward()
        k = "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_q"
        assert net.layers[k].lora_up.grad.abs().sum() > 0
        assert net.layers[k].rho.grad is not None
    finally:
        coll.remove()
        net.restore()
