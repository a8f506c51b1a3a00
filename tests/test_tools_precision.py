"""Rank tools written in fp16/bf16: every command and node stores balanced factors, so the saved ΔW stays
within 0.1 % (fp16) / 0.5 % (bf16) of the fp32 result per module (relative Frobenius error of
ΔW = alpha/rank · up @ down), for ranks 1…512, alpha = rank or not, and lora_up entries from 1e-5 to 1."""
import pytest
import torch

from lora2_train import cli
from lora2_train.format import Adapter, LoRAModule, load_adapter, save_adapter, uniform_alpha

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UP_SCALES = (1e-5, 3e-4, 1e-2, 1.0)
TOL = {"fp16": 1e-3, "bf16": 5e-3}
KEY = "lora_unet_input_blocks_4_1_transformer_blocks_{}_attn1_to_q"


def kohya_adapter(alpha_kind: str, seed: int = 0) -> Adapter:
    """A plain kohya LoRA: one module per (rank, up scale), down ~ N(0, 1/in), up ~ scale · N(0, 1);
    alpha = rank ("rank"), 1 ("one") or 8·rank ("large")."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    i = 0
    for r in RANKS:
        out, inp = (2048, 1280) if r == 512 else (640, 640)
        for s in UP_SCALES:
            alpha = {"rank": float(r), "one": 1.0, "large": 8.0 * r}[alpha_kind]
            down = torch.randn(r, inp, generator=g) / inp ** 0.5
            up = torch.randn(out, r, generator=g) * s
            mods[KEY.format(i)] = LoRAModule(down, up, alpha)
            i += 1
    return Adapter(mods, {"ss_base_model_version": "sdxl_base_v1-0"})


ALPHAS = ("rank", "one", "large")
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
    for m in got.modules.values():
        assert m.down.dtype == m.up.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    errs = rel_errors(got, ref)
    worst = max(errs, key=errs.get)
    print(f"{what} {dtype}: max relative ΔW error {errs[worst]:.3g} ({got.modules[worst].rank=}, {worst})")
    assert errs[worst] <= TOL[dtype], (what, dtype, worst, errs[worst])
    return errs[worst]


COMMANDS = {
    "merge": ["merge", "{a}", "{a}", "--weights", "0.5", "0.5"],
    "merge-rank": ["merge", "{a}", "{a}", "--weights", "0.7", "0.3", "--rank", "512"],
    "merge-energy": ["merge", "{a}", "{a}", "--weights", "0.5", "0.5", "--energy", "0.999"],
    "merge-pad-average": ["merge", "{a}", "{a}", "--mode", "pad-average"],
    "truncate": ["truncate", "{a}", "--max-rank", "512"],
    "truncate-fraction": ["truncate", "{a}", "--fraction", "0.5"],
    "resize": ["resize", "{a}", "--rank", "512"],
    "pad": ["pad", "{a}"],
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
    errs = rel_errors(merged, a)  # 0.5·ΔW + 0.5·ΔW = ΔW
    assert max(errs.values()) <= 1e-6
    padded = run(folder, path, "pad", "fp32")
    for k, m in a.modules.items():
        assert torch.equal(padded.modules[k].delta_weight(), m.delta_weight()), k
    assert max(rel_errors(run(folder, path, "truncate", "fp32"), a).values()) <= 1e-6


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
        assert torch.equal(pm.delta_weight(), m.delta_weight()), k


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_uniform_alpha_conversion_in_half(source, dtype):
    _, path = source
    a = load_adapter(path)
    conv = uniform_alpha(a.modules)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    half = Adapter({k: LoRAModule(m.down.to(dt), m.up.to(dt), m.alpha) for k, m in conv.items()}, {})
    check(half, a, dtype, "uniform_alpha")


# ------------------------------------------------------------------------------------------------ nodes


@pytest.fixture
def node_folder(source, monkeypatch):
    from nodes import _pack
    folder, path = source
    monkeypatch.setattr(_pack, "lora_path", lambda name: str(folder / name))
    return folder, path.name


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["exact", "exact + SVD resize (rank)", "pad-average"])
def test_merge_node_half_output(node_folder, mode, dtype):
    from nodes.tools import MergeLoRA2Adapters
    folder, name = node_folder
    saved = {}
    for dt in (dtype, "fp32"):
        res = MergeLoRA2Adapters().merge(name, 0.5, name, 0.5, mode=mode, rank=512, output_name=f"m_{dt}",
                                         dtype=dt)
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
