"""Rank tools written in fp16/bf16: every command and node stores balanced factors, so the saved ΔW stays
within 0.1 % (fp16) / 0.5 % (bf16) of the fp32 result of the same operation, per module, for ranks 1…512 and
lora_up entries from 1e-5 to 1.

Error of a module: ‖ΔW_half − ΔW_fp32‖_F / ‖ΔW_fp32‖_F, ΔW = alpha/rank · up @ down (the file's own alpha).
The source is a plain kohya file (alpha = rank, scale in ``lora_up``); also alpha = 1 and alpha = 8·rank.
"""
import math

import pytest
import torch

from lora2_train import cli
from lora2_train.format import (Adapter, LoRAModule, adapter_state_dict, load_adapter, save_adapter,
                                uniform_alpha)

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UP_SCALES = (1e-5, 3e-4, 1.0)  # 3e-4: a trained kohya LoRA's lora_up entries
TOL = {"fp16": 1e-3, "bf16": 5e-3}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
KEY = "lora_unet_input_blocks_4_1_transformer_blocks_{}_attn1_to_q"
ALPHAS = ("rank", "one", "large")


def dims(r: int) -> tuple[int, int]:
    """(out, in) of a rank-r module: small, and at least r (so an SVD can keep all r directions)."""
    return (64, 48) if r <= 48 else (r + r // 4, r)


def kohya_adapter(alpha_kind: str, seed: int = 0) -> Adapter:
    """A plain kohya LoRA: one module per (rank, up scale), down ~ N(0, 1/in), up ~ scale · N(0, 1);
    alpha = rank ("rank"), 1 ("one") or 8·rank ("large")."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for r in RANKS:
        out, inp = dims(r)
        for s in UP_SCALES:
            alpha = {"rank": float(r), "one": 1.0, "large": 8.0 * r}[alpha_kind]
            down = torch.randn(r, inp, generator=g) / inp ** 0.5
            up = torch.randn(out, r, generator=g) * s
            mods[KEY.format(len(mods))] = LoRAModule(down, up, alpha)
    return Adapter(mods, {"ss_base_model_version": "sdxl_base_v1-0"})


_SOURCES = {}


@pytest.fixture(params=ALPHAS)
def source(request, tmp_path_factory):
    """(folder, fp32 kohya file) per alpha kind, written once; command outputs are cached next to it."""
    if request.param not in _SOURCES:
        folder = tmp_path_factory.mktemp(f"prec_{request.param}")
        _SOURCES[request.param] = folder, save_adapter(kohya_adapter(request.param), folder / "a.safetensors",
                                                       dtype="fp32")
    return _SOURCES[request.param]


def rel_errors(got: Adapter, ref: Adapter) -> dict[str, float]:
    assert got.modules.keys() == ref.modules.keys()
    out = {}
    for k, m in ref.modules.items():
        d = m.delta_weight().double()
        e = got.modules[k].delta_weight().double()
        assert torch.isfinite(e).all(), k
        out[k] = float(torch.linalg.norm(e - d) / torch.linalg.norm(d))
    return out


def check(got: Adapter, ref: Adapter, dtype: str, what: str) -> float:
    for k, m in got.modules.items():
        assert m.down.dtype == m.up.dtype == HALF[dtype], k
    errs = rel_errors(got, ref)
    worst = max(errs, key=errs.get)
    print(f"\n{what} {dtype}: max relative ΔW error {errs[worst]:.3g} (rank {got.modules[worst].rank}, {worst})")
    assert errs[worst] <= TOL[dtype], (what, dtype, worst, errs[worst])
    return errs[worst]


COMMANDS = {
    "merge": ["merge", "{a}", "{a}", "--weights", "0.5", "0.5"],
    "merge-rank": ["merge", "{a}", "{a}", "--weights", "0.7", "0.3", "--rank", "512"],
    "merge-energy": ["merge", "{a}", "{a}", "--weights", "0.5", "0.5", "--energy", "0.999"],
    "merge-pad-average": ["merge", "{a}", "{a}", "--mode", "pad-average"],
    "truncate": ["truncate", "{a}", "--max-rank", "128"],
    "truncate-fraction": ["truncate", "{a}", "--fraction", "0.5"],
    "resize": ["resize", "{a}", "--rank", "512"],
    "resize-energy": ["resize", "{a}", "--energy", "0.99"],
    "pad": ["pad", "{a}"],
    "pad-rank": ["pad", "{a}", "--rank", "600"],
}


def run(folder, path, command, dtype):
    out = folder / f"{command}_{dtype}.safetensors"
    if not out.exists():
        argv = [a.format(a=path) for a in COMMANDS[command]] + ["-o", str(out), "--dtype", dtype]
        assert cli.main(argv) == 0
    return load_adapter(out)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_half_output_keeps_delta_w_of_the_fp32_output(source, command, dtype):
    folder, path = source
    check(run(folder, path, command, dtype), run(folder, path, command, "fp32"), dtype, command)


def test_cli_exact_paths_stay_exact_in_fp32(source):
    folder, path = source
    a = load_adapter(path)
    merged = run(folder, path, "merge", "fp32")
    assert max(rel_errors(merged, a).values()) <= 1e-6  # 0.5·ΔW + 0.5·ΔW = ΔW
    padded = run(folder, path, "pad", "fp32")
    for k, m in a.modules.items():  # the same entries, zeros appended, the same alpha/rank: ΔW exact
        p, r = padded.modules[k], m.rank  # (ΔW's matmul sums over another inner size: compared to rounding)
        assert torch.equal(p.down[:r], m.down) and torch.equal(p.up[:, :r], m.up), k
        assert not p.down[r:].any() and not p.up[:, r:].any(), k
        assert math.isclose(p.alpha / p.rank, m.alpha / m.rank, rel_tol=1e-12), k
    assert max(rel_errors(padded, a).values()) <= 1e-6
    # one alpha for the file (the largest rank) wherever the dtype has the range for it
    for command in ("merge", "truncate", "resize"):
        out = run(folder, path, command, "fp32")
        assert len({m.alpha for m in out.modules.values()}) == 1, command


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_pad_in_the_input_dtype_changes_no_bit(source, tmp_path, dtype):
    _, path = source
    half = tmp_path / f"h_{dtype}.safetensors"
    assert cli.main(["truncate", str(path), "--max-rank", "512", "-o", str(half), "--dtype", dtype]) == 0
    out = tmp_path / "p.safetensors"
    assert cli.main(["pad", str(half), "-o", str(out)]) == 0
    a, p = load_adapter(half), load_adapter(out)
    for k, m in a.modules.items():
        pm = p.modules[k]
        assert torch.equal(pm.down[: m.rank], m.down) and torch.equal(pm.up[:, : m.rank], m.up), k
        # zeros appended, alpha/rank kept: the same ΔW (a matmul over the longer rank rounds alike, not bitwise)
        assert not pm.down[m.rank:].any() and not pm.up[:, m.rank:].any(), k
        assert math.isclose(pm.alpha / pm.rank, m.alpha / m.rank, rel_tol=1e-12), k


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_uniform_alpha_conversion_in_half(source, tmp_path, dtype):
    _, path = source
    a = load_adapter(path)
    conv = Adapter(uniform_alpha(a.modules), a.metadata)
    check(load_adapter(save_adapter(conv, tmp_path / "u.safetensors", dtype=dtype)), a, dtype, "uniform_alpha")


def test_half_writer_moves_scale_into_alpha_only_where_fp16_needs_it():
    """A module whose balanced factors would sit in fp16's subnormal range gets alpha·4^-k (factors ·2^k,
    exact); the others, and every bf16 module, keep their alpha."""
    g = torch.Generator().manual_seed(1)
    tiny = LoRAModule(torch.randn(2, 64, generator=g) * 1e-5, torch.randn(64, 2, generator=g) * 1e-5, 1024.0)
    fine = LoRAModule(torch.randn(8, 64, generator=g) / 8, torch.randn(64, 8, generator=g) / 8, 1024.0)
    ad = Adapter({"a": tiny, "b": fine}, {})
    sd = adapter_state_dict(ad, "fp16")
    assert float(sd["b.alpha"]) == 1024.0
    k = torch.log(torch.tensor(1024.0 / float(sd["a.alpha"]))) / torch.log(torch.tensor(4.0))
    assert float(k) >= 1 and float(k) == round(float(k))
    for name, m in (("a", tiny), ("b", fine)):
        got = LoRAModule(sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"]))
        d = m.delta_weight().double()
        assert float(torch.linalg.norm(got.delta_weight().double() - d) / torch.linalg.norm(d)) <= 1e-3, name
    sd = adapter_state_dict(ad, "bf16")
    assert float(sd["a.alpha"]) == float(sd["b.alpha"]) == 1024.0
    assert float(adapter_state_dict(ad, "fp32")["a.alpha"]) == 1024.0


# ------------------------------------------------------------------------------------------------ nodes


@pytest.fixture
def node_folder(source, monkeypatch):
    from nodes import _pack
    folder, path = source
    monkeypatch.setattr(_pack, "lora_path", lambda name: str(folder / name))
    return folder, path.name


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["exact", "exact + SVD resize (rank)", "exact + SVD resize (energy)",
                                  "pad-average"])
def test_merge_node_half_output(node_folder, mode, dtype):
    from nodes.tools import MergeLoRA2Adapters
    folder, name = node_folder
    saved = {}
    for dt in (dtype, "fp32"):
        res = MergeLoRA2Adapters().merge(name, 0.5, name, 0.5, mode=mode, rank=512, energy=0.999,
                                         output_name=f"m_{dt}", dtype=dt)
        saved[dt] = load_adapter(folder / res["result"][0])
    check(saved[dtype], saved["fp32"], dtype, f"Merge node {mode}")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_zero_pad_node_half_output(node_folder, dtype):
    from nodes.tools import ZeroPadLoRA2Adapter
    folder, name = node_folder
    res = ZeroPadLoRA2Adapter().pad(name, rank=600, output_name="p", dtype=dtype)
    got = load_adapter(folder / res["result"][0])
    assert set(got.ranks().values()) == {600}
    check(got, load_adapter(folder / name), dtype, "Zero-Pad node")
