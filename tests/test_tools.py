"""Rank tools: invariants (pad keeps ΔW bit for bit, truncation drops the least important positions,
merge equals the weighted sum) and the command line."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from lora2_train import cli
from lora2_train.format import Adapter, LoRAModule, load_adapter, save_adapter
from lora2_train.tools import inspect_adapter, merge, pad, resize, truncate
from lora2_train.tools.svd import factor_svd

LIN = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn{}_to_{}"
CONV = "lora_unet_input_blocks_1_0_in_layers_2"


def module(out, inp, r, alpha=None, conv=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if conv:
        down, up = torch.randn(r, inp, 3, 3, generator=g), torch.randn(out, r, 1, 1, generator=g)
    else:
        down, up = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
    return LoRAModule(down, up, float(r if alpha is None else alpha))


def ragged(seed=0, lora2=True, ranks=(2, 5, 8, 3), alphas=(None, 1.0, 4.0, 3.0)):
    mods = {}
    for i, (r, a) in enumerate(zip(ranks, alphas)):
        mods[LIN.format(1 + i % 2, "qkvo"[i])] = module(24, 16, r, a, seed=seed + i)
    mods[CONV] = module(8, 6, 4, 2.0, conv=True, seed=seed + 9)
    meta = {"ss_base_model_version": "sdxl_base_v1-0"}
    if lora2:
        meta.update({"lora2_version": "1", "lora2_order": "importance"})
    return Adapter(mods, meta)


def svd_spectrum_module(sigmas, out=20, inp=12, seed=0, perm=None):
    """A module with a known spectrum, positions shuffled by `perm` (so position order ≠ importance)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(sigmas), generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, len(sigmas), generator=g))
    s = torch.tensor(sigmas, dtype=torch.float32)
    perm = perm if perm is not None else list(range(len(sigmas)))
    return LoRAModule(v.T[perm].contiguous(), (u * s)[:, perm].contiguous(), float(len(sigmas)))


# ------------------------------------------------------------------------------------------------ pad


def test_pad_keeps_delta_w_bit_identical_and_makes_ranks_uniform():
    ad = ragged()
    out = pad(ad)
    assert set(out.ranks().values()) == {8}
    for k, m in ad.modules.items():
        assert torch.equal(out.modules[k].delta_weight(), m.delta_weight()), k
        assert out.modules[k].scale == m.scale
    assert json.loads(out.metadata["lora2_ranks"]) == out.ranks()
    assert out.metadata["ss_network_dim"] == "8"


def test_pad_through_a_file_keeps_delta_w_bit_identical(tmp_path):
    ad = ragged()
    src = save_adapter(ad, tmp_path / "a.safetensors", dtype="fp16")
    back = load_adapter(src)
    padded = load_adapter(save_adapter(pad(back, 16), tmp_path / "p.safetensors", dtype=None))
    assert set(padded.ranks().values()) == {16}
    for k, m in back.modules.items():
        assert padded.modules[k].down.dtype == torch.float16
        assert torch.equal(padded.modules[k].delta_weight(), m.delta_weight()), k


def test_pad_refuses_a_rank_below_the_largest():
    with pytest.raises(ValueError, match="largest module rank 8"):
        pad(ragged(), 6)


# ------------------------------------------------------------------------------------------- truncate


def test_truncate_lora2_keeps_the_first_positions_without_svd():
    ad = ragged()
    out = truncate(ad, max_rank=3)
    assert out.ranks() == {k: min(3, r) for k, r in ad.ranks().items()}
    for k, m in ad.modules.items():
        t = out.modules[k]
        k_ = t.rank
        assert torch.equal(t.down, m.down[:k_])
        assert t.alpha == 3.0  # one alpha for the whole file (the max rank); ΔW of the kept positions unchanged
        ref = m.scale * (m.up.flatten(1)[:, :k_] @ m.down.flatten(1)[:k_]).reshape(m.delta_weight().shape)
        assert torch.allclose(t.delta_weight(), ref, atol=1e-5)
    assert out.order == "importance"


def test_truncate_other_files_orders_by_svd_first_and_removes_the_least_important():
    sig = [10.0, 7.0, 5.0, 3.0, 1.0, 0.5]
    m = svd_spectrum_module(sig, perm=[4, 1, 5, 0, 3, 2])  # importance hidden in a shuffled order
    ad = Adapter({LIN.format(1, "q"): m}, {})
    assert ad.order == "none"
    for k in (1, 2, 4):
        t = truncate(ad, max_rank=k).modules[LIN.format(1, "q")]
        err = torch.linalg.matrix_norm(t.delta_weight() - m.delta_weight()).item()
        assert err == pytest.approx(math.sqrt(sum(s * s for s in sig[k:])), rel=1e-4)  # Eckart–Young optimum
    # a plain prefix of the shuffled positions would be much worse
    naive = LoRAModule(m.down[:2], m.up[:, :2], 2.0)
    assert torch.linalg.matrix_norm(naive.delta_weight() - m.delta_weight()) > 5.0


def test_truncate_fraction_rounds_up_and_keeps_one():
    out = truncate(ragged(), fraction=0.5)
    assert sorted(out.ranks().values()) == [1, 2, 2, 3, 4]


def test_truncate_parameter_budget_takes_the_most_important_positions():
    a = svd_spectrum_module([9.0, 8.0, 7.0, 6.0], seed=1)
    b = svd_spectrum_module([5.0, 0.1, 0.05, 0.01], seed=2)
    ad = Adapter({LIN.format(1, "q"): a, LIN.format(1, "k"): b}, {"lora2_order": "svd"})
    per = 20 + 12
    out = truncate(ad, params=5 * per)
    assert out.ranks() == {LIN.format(1, "q"): 4, LIN.format(1, "k"): 1}
    assert out.num_parameters() <= 5 * per
    with pytest.raises(ValueError, match="below 64"):
        truncate(ad, params=63)


def test_truncate_needs_exactly_one_budget():
    with pytest.raises(ValueError, match="exactly one"):
        truncate(ragged(), max_rank=2, fraction=0.5)
    with pytest.raises(ValueError, match="fraction"):
        truncate(ragged(), fraction=1.5)


# ---------------------------------------------------------------------------------------------- merge


def test_exact_merge_is_the_weighted_sum_of_delta_w():
    a, b, c = ragged(0), ragged(10, ranks=(7, 1, 2, 6)), ragged(20, lora2=False)
    del c.modules[CONV]
    w = [0.7, -0.4, 1.3]
    out = merge([a, b, c], weights=w)
    for k in a.modules:
        ref = sum(wi * ad.modules[k].delta_weight() for wi, ad in zip(w, (a, b, c)) if k in ad.modules)
        assert torch.allclose(out.modules[k].delta_weight(), ref, atol=1e-4), k
        assert out.modules[k].rank == sum(ad.modules[k].rank for ad in (a, b, c) if k in ad.modules)
    assert out.order == "none"
    assert json.loads(out.metadata["lora2_merge"])["weights"] == w


def test_exact_merge_recompressed_by_rank_or_energy_gives_ragged_output():
    a, b = ragged(0), ragged(10)
    exact = merge([a, b])
    by_rank = merge([a, b], rank=4)
    assert max(by_rank.ranks().values()) == 4 and by_rank.order == "svd"
    by_energy = merge([a, b], energy=0.95)
    assert len(set(by_energy.ranks().values())) > 1
    for k, m in exact.modules.items():
        d = m.delta_weight()
        err = torch.linalg.matrix_norm(by_energy.modules[k].delta_weight().flatten(1) - d.flatten(1))
        assert err ** 2 <= 0.05 * torch.linalg.matrix_norm(d.flatten(1)) ** 2 * 1.001


def test_pad_average_is_the_papers_factor_average():
    a, b = ragged(0), ragged(10, ranks=(7, 1, 2, 6))
    out = merge([a, b], mode="pad-average")
    k = LIN.format(1, "q")
    ma, mb = a.modules[k], b.modules[k]
    r = max(ma.rank, mb.rank)
    up = torch.zeros(24, r)
    down = torch.zeros(r, 16)
    for m in (ma, mb):
        up[:, : m.rank] += 0.5 * m.scale * m.up
        down[: m.rank] += 0.5 * m.down
    assert out.modules[k].rank == r
    assert torch.allclose(out.modules[k].delta_weight(), up @ down, atol=1e-5)
    exact = merge([a, b], weights=[0.5, 0.5])
    assert not torch.allclose(out.modules[k].delta_weight(), exact.modules[k].delta_weight(), atol=1e-2)


def test_merge_refuses_different_base_models_and_shapes():
    a, b = ragged(0), ragged(1)
    b.metadata["ss_base_model_version"] = "sd_v1"
    with pytest.raises(ValueError, match="b.safetensors.*different base models"):
        merge([a, b], names=["a.safetensors", "b.safetensors"])
    c = ragged(2)
    c.modules[LIN.format(1, "q")] = module(32, 16, 4)
    with pytest.raises(ValueError, match="attn1_to_q.*shape"):
        merge([a, c])
    with pytest.raises(ValueError, match="2 values for 3"):
        merge([a, a, a], weights=[1, 1])


# --------------------------------------------------------------------------------------------- resize


def test_resize_by_energy_keeps_the_smallest_rank_reaching_it():
    sig = [4.0, 2.0, 1.0, 0.5]
    m = svd_spectrum_module(sig, perm=[3, 2, 1, 0])
    ad = Adapter({LIN.format(1, "q"): m}, {})
    total = sum(s * s for s in sig)
    assert resize(ad, energy=16 / total).ranks()[LIN.format(1, "q")] == 1
    assert resize(ad, energy=(16 + 4) / total).ranks()[LIN.format(1, "q")] == 2
    assert resize(ad, energy=(16 + 4) / total + 1e-3).ranks()[LIN.format(1, "q")] == 3
    r2 = resize(ad, rank=2).modules[LIN.format(1, "q")]
    _, s, _ = factor_svd(r2)
    assert torch.allclose(s, torch.tensor([4.0, 2.0]), atol=1e-5)
    assert r2.alpha == 2.0


def test_factor_svd_matches_the_dense_svd():
    m = module(24, 16, 6, 3.0, seed=3)
    u, s, vh = factor_svd(m)
    dense = torch.linalg.svdvals(m.delta_weight())
    assert torch.allclose(s, dense[:6], rtol=1e-4)
    assert torch.allclose((u * s) @ vh, m.delta_weight(), atol=1e-4)
    c = module(8, 6, 4, 2.0, conv=True)
    u, s, vh = factor_svd(c)
    assert torch.allclose(((u * s) @ vh).reshape(c.delta_weight().shape), c.delta_weight(), atol=1e-4)


# -------------------------------------------------------------------------------------------- inspect


def test_inspect_counts_ranks_parameters_and_bytes():
    ad = ragged()
    info = inspect_adapter(ad)
    t = info["totals"]
    assert t["modules"] == 5 and t["params"] == ad.num_parameters()
    assert (t["min_rank"], t["max_rank"]) == (2, 8)
    assert t["bytes"]["fp16"] == 2 * ad.num_parameters() + 4 * 5
    row = next(r for r in info["modules"] if r["module"] == CONV)
    assert row["shape"] == [8, 6, 3, 3] and row["rank"] == 4 and row["component"] == "conv"
    assert info["order"] == "importance"


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("command", ["inspect", "truncate", "pad", "merge", "resize", "plot"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_cli_round_trip_pad_truncate_merge_resize_inspect_plot(tmp_path, capsys):
    a = save_adapter(ragged(0), tmp_path / "a.safetensors", dtype="fp32")
    b = save_adapter(ragged(5, lora2=False), tmp_path / "b.safetensors", dtype="bf16")
    p = tmp_path / "p.safetensors"
    assert cli.main(["pad", str(a), "-o", str(p), "--rank", "10"]) == 0
    assert set(load_adapter(p).ranks().values()) == {10}
    assert cli.main(["truncate", str(p), "-o", str(tmp_path / "t.safetensors"), "--max-rank", "3"]) == 0
    t = load_adapter(tmp_path / "t.safetensors")
    assert t.ranks() == {k: min(3, r) for k, r in ragged(0).ranks().items()}
    assert cli.main(["merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--weights", "1", "0.5"]) == 0
    m = load_adapter(tmp_path / "m.safetensors")
    assert m.modules[CONV].down.dtype == torch.float32  # dtype of the first input
    assert cli.main(["resize", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "r.safetensors"),
                     "--energy", "0.9", "--dtype", "fp16"]) == 0
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        assert f.get_tensor(f"{CONV}.lora_down.weight").dtype == torch.float16
        assert f.metadata()["lora2_order"] == "svd"
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "m.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["modules"] == 5 and info["metadata"]["lora2_merge"]["weights"] == [1.0, 0.5]
    assert cli.main(["inspect", str(a)]) == 0
    text = capsys.readouterr().out
    assert CONV in text and "8x6x3x3" in text and "fp16" in text
    assert cli.main(["plot", str(a), str(b), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exact_merge_of_half_inputs_keeps_fp32_precision_and_leaves_inputs_alone():
    def half(ad):
        return Adapter({k: LoRAModule(m.down.half(), m.up.half(), m.alpha) for k, m in ad.modules.items()},
                       ad.metadata)
    a, b = half(ragged(0)), half(ragged(10, ranks=(7, 1, 2, 6)))
    before = {k: m.up.clone() for k, m in a.modules.items()}
    out = merge([a, b], weights=[1.0, 0.5])
    for k in a.modules:
        ref = a.modules[k].delta_weight() + 0.5 * b.modules[k].delta_weight()
        torch.testing.assert_close(out.modules[k].delta_weight(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.modules[k].up, before[k])
