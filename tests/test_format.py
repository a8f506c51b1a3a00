import json

import pytest
import torch
from safetensors import safe_open

from lora2_train.config import LoRA2Config
from lora2_train.format import (AdapterFormatError, adapter_from_network, load_adapter, save_adapter)
from lora2_train.network import LoRA2Network


def ragged_network(tiny_koala):
    cfg = LoRA2Config(r_init=8, r_target=8, r_max=32, targets="attn")
    net = LoRA2Network(cfg, tiny_koala)
    with torch.no_grad():
        for i, l in enumerate(net.layers.values()):
            l.resize(4 + 4 * (i % 5))
            l.lora_up.normal_(std=0.05)
    return cfg, net


def test_written_file_is_kohya_with_ragged_ranks_and_metadata(tmp_path, tiny_koala):
    cfg, net = ragged_network(tiny_koala)
    path = save_adapter(adapter_from_network(net, cfg), tmp_path / "a.safetensors", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        for name, layer in net.layers.items():
            assert f.get_tensor(f"{name}.lora_down.weight").shape == (layer.rank, layer.in_dim)
            assert f.get_tensor(f"{name}.lora_up.weight").shape == (layer.out_dim, layer.rank)
            assert float(f.get_tensor(f"{name}.alpha")) == max(net.ranks().values())  # one alpha per file
    assert len(keys) == 3 * len(net.layers)
    ranks = json.loads(meta["lora2_ranks"])
    assert ranks == net.ranks() and len(set(ranks.values())) == 5
    assert meta["ss_network_dim"] == str(max(ranks.values()))
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["lora2_config"])["q"] == 0.9
    assert set(json.loads(meta["lora2_nu"])) == set(ranks)


def test_file_delta_w_equals_network_delta_w(tmp_path, tiny_koala):
    cfg, net = ragged_network(tiny_koala)
    path = save_adapter(adapter_from_network(net, cfg), tmp_path / "a.safetensors", dtype="fp32")
    ad = load_adapter(path)
    for name, layer in net.layers.items():
        assert torch.allclose(ad.modules[name].delta_weight(), layer.delta_weight(), atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_round_trip_tensors_and_metadata(tmp_path, tiny_koala, dtype):
    cfg, net = ragged_network(tiny_koala)
    ad = adapter_from_network(net, cfg)
    path = save_adapter(ad, tmp_path / "a.safetensors", dtype=dtype)
    back = load_adapter(path)
    assert back.ranks() == ad.ranks()
    assert {k: v for k, v in back.metadata.items() if k != "lora2_dtype"} == ad.metadata
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for k, m in ad.modules.items():
        assert back.modules[k].down.dtype == dt
        assert torch.equal(back.modules[k].down, m.down.to(dt))
        assert torch.equal(back.modules[k].up, m.up.to(dt))


def test_never_overwrites_and_writes_atomically(tmp_path, tiny_koala):
    cfg, net = ragged_network(tiny_koala)
    ad = adapter_from_network(net, cfg)
    p = tmp_path / "a.safetensors"
    p.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="a.safetensors"):
        save_adapter(ad, p)
    assert p.read_bytes() == b"precious"
    save_adapter(ad, p, overwrite=True)
    assert load_adapter(p).ranks() == ad.ranks()
    assert [x.name for x in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary file left


def test_reader_rejects_pickles_and_garbage(tmp_path):
    pt = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(AdapterFormatError, match="x.pt.*pickle"):
        load_adapter(pt)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(AdapterFormatError, match="bad.safetensors"):
        load_adapter(bad)


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "noalpha.safetensors"
    m = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{m}.lora_down.weight": torch.ones(3, 4), f"{m}.lora_up.weight": torch.ones(5, 3)}, str(p))
    ad = load_adapter(p)
    assert ad.modules[m].alpha == 3.0
    assert torch.allclose(ad.modules[m].delta_weight(), torch.full((5, 4), 3.0))


def test_output_names_stay_inside_the_folder(tmp_path):
    from lora2_train.format import output_path
    assert output_path(tmp_path, "mine") == (tmp_path / "mine.safetensors").resolve()
    assert output_path(tmp_path, "sub/mine.safetensors") == (tmp_path / "sub" / "mine.safetensors").resolve()
    for bad in ("../x", "/etc/x", "a/../../x", "", "..", "a\\..\\x"):
        with pytest.raises(ValueError, match="output name"):
            output_path(tmp_path, bad)


def test_written_files_get_the_usual_mode(tmp_path):
    import os
    from lora2_train.format import atomic_write_bytes
    old = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "x.bin", b"data")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def test_mapped_read_equals_copied_read_even_for_unaligned_tensors(tmp_path):
    from safetensors.torch import save_file
    from lora2_train.format import read_safetensors
    m = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"
    sd = {f"{m}.alpha": torch.tensor(3.0, dtype=torch.float16),  # 2 bytes: what follows is not 4-aligned
          f"{m}.lora_down.weight": torch.randn(3, 5), f"{m}.lora_up.weight": torch.randn(7, 3).bfloat16()}
    p = tmp_path / "u.safetensors"
    save_file(sd, str(p))
    copied, _ = read_safetensors(p)
    mapped, _ = read_safetensors(p, mapped=True)
    for k in sd:
        assert mapped[k].dtype == copied[k].dtype and torch.equal(mapped[k], copied[k]), k
    assert load_adapter(p, mapped=True).modules[m].alpha == 3.0


@pytest.mark.parametrize("mapped", [False, True])
def test_non_finite_values_are_found_at_any_position_in_any_float_dtype(tmp_path, mapped):
    """The value scan reads whole runs of same-dtype tensors; whatever the run layout, it names the bad tensor."""
    from safetensors.torch import save_file
    from lora2_train.format import read_safetensors
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    sd = {f"t{i:02d}_{str(dt)[6:]}": torch.randn(int(torch.randint(1, 9, (1,), generator=g)),
                                                 int(torch.randint(1, 40, (1,), generator=g)), generator=g).to(dt)
          for i, dt in enumerate(dtypes * 4)}
    sd["odd_fp16_scalar"] = torch.tensor(1.0, dtype=torch.float16)  # 2 bytes: leaves what follows unaligned
    sd["ints"] = torch.arange(7, dtype=torch.int16)
    clean = tmp_path / "clean.safetensors"
    save_file(sd, str(clean))
    got, _ = read_safetensors(clean, mapped=mapped)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    cases = 0
    for key, t in sd.items():
        if not t.is_floating_point():
            continue
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = t.clone().reshape(-1)
            bad[int(torch.randint(0, bad.numel(), (1,), generator=g))] = value
            p = tmp_path / f"bad_{cases}.safetensors"
            save_file({**sd, key: bad.reshape(t.shape)}, str(p))
            word = "NaN" if value != value else "Inf"
            with pytest.raises(AdapterFormatError, match=rf"bad_{cases}\.safetensors: tensor '{key}' contains {word}"):
                read_safetensors(p, mapped=mapped)
            cases += 1
    assert cases == 17 * 3


def test_fp8_tensors_are_checked_too(tmp_path):
    from safetensors.torch import save_file
    from lora2_train.format import read_safetensors
    t = torch.randn(4, 8).to(torch.float8_e4m3fn)
    save_file({"a": t}, str(tmp_path / "ok.safetensors"))
    assert read_safetensors(tmp_path / "ok.safetensors")[0]["a"].dtype == torch.float8_e4m3fn
    bad = t.clone()
    bad.view(torch.uint8)[1, 2] = 0x7F  # e4m3fn NaN
    save_file({"a": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(AdapterFormatError, match="nan.safetensors: tensor 'a' contains NaN"):
        read_safetensors(tmp_path / "nan.safetensors")


def test_a_file_replaced_while_it_is_read_is_refused(tmp_path, monkeypatch):
    """The header, the value scan and the tensors must all come from one file: a swap in between is an error."""
    from safetensors.torch import save_file
    import lora2_train.format as fmt
    p = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(3)}, str(p))
    real_open = fmt.safe_open

    def swapping_open(name, **kw):
        q = tmp_path / "b.safetensors"
        save_file({"x": torch.full((3,), 2.0)}, str(q))
        q.replace(p)  # another program saves a new version under the same name mid-read
        return real_open(name, **kw)

    monkeypatch.setattr(fmt, "safe_open", swapping_open)
    with pytest.raises(AdapterFormatError, match="a.safetensors: the file was replaced or changed while it was read"):
        fmt.read_safetensors(p)
    monkeypatch.setattr(fmt, "safe_open", real_open)
    assert fmt.read_safetensors(p)[0]["x"].tolist() == [2.0, 2.0, 2.0]


def test_empty_tensors_sharing_an_offset_read_back(tmp_path):
    """An empty tensor has the byte range [x, x]; beside a tensor starting at x the ranges still tile, whatever
    order the header lists them in (here: by name, so a16 [44, 50] comes before z_empty [44, 44])."""
    from safetensors.torch import save_file
    from lora2_train.format import read_safetensors
    sd = {"a_empty": torch.zeros(0, 4), "b": torch.randn(2, 3), "c_empty": torch.zeros(3, 0), "d": torch.randn(5),
          "a16": torch.randn(3).half(), "z_empty": torch.zeros(0)}
    save_file(sd, str(tmp_path / "data_order.safetensors"))
    raw = (tmp_path / "data_order.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "e.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:  # a valid file for safetensors itself
        assert list(f.keys()) and torch.equal(f.get_tensor("a16"), sd["a16"])
    for mapped in (False, True):
        got, _ = read_safetensors(tmp_path / "e.safetensors", mapped=mapped)
        assert all(got[k].shape == v.shape and torch.equal(got[k], v) for k, v in sd.items())


class _Net:
    """What adapter_from_network reads of a LoRA2Network: .layers and .nus()."""

    def __init__(self, layers):
        self.layers = layers

    def nus(self):
        return {k: float(l.nu().detach()) for k, l in self.layers.items()}


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("bf16", 5e-3)])
def test_half_precision_files_keep_delta_w_for_every_rank_from_1_to_512(tmp_path, dtype, tol):
    from lora2_train.layer import AdaptiveLoRA

    torch.manual_seed(0)
    layers = {}
    for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        layer = AdaptiveLoRA(f"lora_unet_m{r}", torch.nn.Linear(640, 640), r_init=64, q=0.9, r_max=512, block=1)
        layer.set_rank(r)
        with torch.no_grad():
            layer.lora_up.normal_(std=1e-4)  # trained B: small
        layers[f"lora_unet_m{r}"] = layer
    adapter = adapter_from_network(_Net(layers))
    assert {m.alpha for m in adapter.modules.values()} == {512.0}
    path = save_adapter(adapter, tmp_path / "ragged.safetensors", dtype=dtype)
    back = load_adapter(path)
    for key, layer in layers.items():
        ref = layer.delta_weight().double()
        err = float((back.modules[key].delta_weight().double() - ref).norm() / ref.norm())
        assert err < tol, (key, err)
