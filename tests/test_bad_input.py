"""Bad input, table-driven: every case ends in one stderr line naming the file (and the key where there is
one), a non-zero exit, and no output file; an existing output is never touched."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora2_train import cli

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"


def good(r=4, out=8, inp=6, name=Q):
    return {f"{name}.lora_down.weight": torch.randn(r, inp), f"{name}.lora_up.weight": torch.randn(out, r),
            f"{name}.alpha": torch.tensor(float(r))}


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def raw(path, header: dict | str, data: bytes = b""):
    """A safetensors file with a hand-written header (to make it lie)."""
    text = header if isinstance(header, str) else json.dumps(header)
    blob = text.encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def entry(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def _f(tmp, name="bad.safetensors"):
    return tmp / name


# Each case: id → (builder(tmp) -> input path, words that the error line must contain)
CASES = {
    "pickle_pt": (lambda t: (torch.save({"a": torch.zeros(1)}, t / "x.pt"), t / "x.pt")[1], ["x.pt", "pickle"]),
    "pickle_ckpt": (lambda t: (torch.save({}, t / "x.ckpt"), t / "x.ckpt")[1], ["x.ckpt", "pickle"]),
    "pickle_pth": (lambda t: (torch.save({}, t / "x.pth"), t / "x.pth")[1], ["x.pth", "pickle"]),
    "pickle_bin": (lambda t: (torch.save({}, t / "x.bin"), t / "x.bin")[1], ["x.bin", "pickle"]),
    "pickle_renamed": (lambda t: (torch.save(good(), _f(t)), _f(t))[1], ["bad.safetensors", "not a safetensors"]),
    "other_suffix": (lambda t: ((t / "x.json").write_text("{}"), t / "x.json")[1], ["x.json", ".safetensors"]),
    "missing_file": (lambda t: t / "nope.safetensors", ["nope.safetensors", "no such file"]),
    "empty_file": (lambda t: (_f(t).write_bytes(b""), _f(t))[1], ["bad.safetensors", "truncated"]),
    "five_bytes": (lambda t: (_f(t).write_bytes(b"\x01\x02\x03\x04\x05"), _f(t))[1], ["bad.safetensors", "truncated"]),
    "header_longer_than_file": (lambda t: (_f(t).write_bytes(struct.pack("<Q", 10_000) + b"{}"), _f(t))[1],
                                ["bad.safetensors", "header length 10000"]),
    "header_not_json": (lambda t: raw(_f(t), "{not json at all"), ["bad.safetensors", "not valid JSON"]),
    "header_not_object": (lambda t: raw(_f(t), "[1, 2]"), ["bad.safetensors", "not a JSON object"]),
    "truncated_data": (lambda t: _truncate(write(_f(t), good())), ["bad.safetensors", "past the end", "lora_"]),
    "header_lies_about_size": (lambda t: raw(_f(t), {f"{Q}.lora_down.weight": entry("F32", [4, 6], 0, 40)},
                                             bytes(40)), ["bad.safetensors", Q, "96 bytes"]),
    "offsets_past_end": (lambda t: raw(_f(t), {f"{Q}.lora_down.weight": entry("F32", [2, 2], 0, 16)}, bytes(8)),
                         ["bad.safetensors", Q, "past the end"]),
    "duplicate_header_key": (lambda t: raw(_f(t), '{"%s.alpha": %s, "%s.alpha": %s}' % (
        Q, json.dumps(entry("F32", [], 0, 4)), Q, json.dumps(entry("F32", [], 0, 4))), bytes(4)),
        ["bad.safetensors", "duplicate key", Q]),
    "overlapping_ranges": (lambda t: raw(_f(t), {f"{Q}.alpha": entry("F32", [], 0, 4),
                                                 f"{K}.alpha": entry("F32", [], 0, 4)}, bytes(4)),
                           ["bad.safetensors", "overlapping"]),
    "unknown_dtype": (lambda t: raw(_f(t), {f"{Q}.alpha": entry("F17", [], 0, 4)}, bytes(4)),
                      ["bad.safetensors", Q, "F17"]),
    "negative_shape": (lambda t: raw(_f(t), {f"{Q}.alpha": entry("F32", [-1], 0, 4)}, bytes(4)),
                       ["bad.safetensors", Q, "shape"]),
    "metadata_not_string": (lambda t: raw(_f(t), {"__metadata__": {"ss_network_dim": 4},
                                                  f"{Q}.alpha": entry("F32", [], 0, 4)}, bytes(4)),
                            ["bad.safetensors", "ss_network_dim", "not a string"]),
    "metadata_not_object": (lambda t: raw(_f(t), {"__metadata__": [1], f"{Q}.alpha": entry("F32", [], 0, 4)},
                                          bytes(4)), ["bad.safetensors", "__metadata__"]),
    "no_tensors": (lambda t: raw(_f(t), {}), ["bad.safetensors", "no tensors"]),
    # a valid file with bytes after the last tensor, or whose header length is 4 bytes short (its header is
    # padded with spaces, so the shorter header still parses and every tensor would be read 4 bytes early)
    "bytes_after_last_tensor": (lambda t: _append(write(_f(t), good()), bytes(8)),
                                ["bad.safetensors", "8 bytes follow the last tensor", Q]),
    "header_length_short": (lambda t: _short_header(write(_f(t), good()), 4),
                            ["bad.safetensors", "4 bytes follow the last tensor", Q]),
    # the same tensor twice, the first copy (NaN data) with an escaped field name, the second over 1.0
    "duplicate_key_escaped": (lambda t: raw(_f(t), '{"%s.alpha": %s, "%s.alpha": %s}' % (
        Q, json.dumps(entry("F32", [], 4, 8)).replace("data_offsets", "data\\u005foffsets"), Q,
        json.dumps(entry("F32", [], 0, 4))), struct.pack("<2f", 1.0, float("nan"))),
        ["bad.safetensors", "duplicate key", f"{Q}.alpha"]),
    "duplicate_key_escaped_in_name": (lambda t: raw(_f(t), '{"%s.alpha": %s, "%s\\u002ealpha": %s}' % (
        Q, json.dumps(entry("F32", [], 0, 4)), Q, json.dumps(entry("F32", [], 4, 8))),
        struct.pack("<2f", float("nan"), 1.0)), ["bad.safetensors", "duplicate key", f"{Q}.alpha"]),
    "duplicate_field": (lambda t: raw(_f(t), '{"%s.alpha": {"dtype": "F32", "shape": [2], "shape": [], '
                                             '"data_offsets": [0, 4]}}' % Q, bytes(4)),
                        ["bad.safetensors", f"{Q}.alpha", "duplicate field 'shape'"]),
    "two_metadata": (lambda t: raw(_f(t), '{"__metadata__": {"ss_network_dim": "4"}, "__metadata__": {}, '
                                          '"%s.alpha": %s}' % (Q, json.dumps(entry("F32", [], 0, 4))), bytes(4)),
                     ["bad.safetensors", "duplicate key '__metadata__'"]),
    "duplicate_metadata_key": (lambda t: raw(_f(t), '{"__metadata__": {"a": "1", "a": "2"}, "%s.alpha": %s}'
                                             % (Q, json.dumps(entry("F32", [], 0, 4))), bytes(4)),
                               ["bad.safetensors", "metadata", "duplicate key 'a'"]),
    "metadata_empty_list": (lambda t: raw(_f(t), {"__metadata__": [], f"{Q}.alpha": entry("F32", [], 0, 4)},
                                          bytes(4)), ["bad.safetensors", "__metadata__", "not an object"]),
    "dtype_is_a_list": (lambda t: raw(_f(t), {f"{Q}.alpha": entry(["F32"], [], 0, 4)}, bytes(4)),
                        ["bad.safetensors", Q, "unknown dtype ['F32']"]),
    "deeply_nested": (lambda t: raw(_f(t), '{"%s.alpha": %s}' % (Q, "[" * 100_000 + "]" * 100_000)),
                      ["bad.safetensors", "nests too deeply"]),
    "shape_of_booleans": (lambda t: raw(_f(t), '{"%s.alpha": {"dtype": "F32", "shape": [true], '
                                               '"data_offsets": [0, 4]}}' % Q, bytes(4)),
                          ["bad.safetensors", Q, "invalid shape [True]"]),
    "negative_zero_offset": (lambda t: raw(_f(t), '{"%s.alpha": {"dtype": "F32", "shape": [], '
                                                  '"data_offsets": [-0, 4]}}' % Q, bytes(4)),
                             ["bad.safetensors", Q, "data_offsets"]),
    "unknown_entry_field": (lambda t: raw(_f(t), {f"{Q}.alpha": {**entry("F32", [], 0, 4), "x": 1}}, bytes(4)),
                            ["bad.safetensors", Q, "unknown field 'x'"]),
    "lone_surrogate_key": (lambda t: raw(_f(t), '{"%s\\ud800": %s}' % (Q, json.dumps(entry("F32", [], 0, 4))),
                                         bytes(4)), ["bad.safetensors", Q, "surrogate"]),
    "too_many_elements": (lambda t: raw(_f(t), {f"{Q}.alpha": entry("F32", [2 ** 30, 2 ** 30, 0], 0, 0)}),
                          ["bad.safetensors", Q, "more than 2^48 elements"]),
    "rank_mismatch": (lambda t: write(_f(t), {**good(), f"{Q}.lora_up.weight": torch.randn(8, 3)}),
                      ["bad.safetensors", Q, "rank 4 != lora_up rank 3"]),
    "missing_up": (lambda t: write(_f(t), {f"{Q}.lora_down.weight": torch.randn(4, 6)}),
                   ["bad.safetensors", Q, "lora_up"]),
    "alpha_only": (lambda t: write(_f(t), {**good(), f"{K}.alpha": torch.tensor(2.0)}),
                   ["bad.safetensors", K, "lora_down"]),
    "nan_down": (lambda t: write(_f(t), {**good(), f"{Q}.lora_down.weight": torch.full((4, 6), float("nan"))}),
                 ["bad.safetensors", f"{Q}.lora_down.weight", "NaN"]),
    "inf_up": (lambda t: write(_f(t), {**good(), f"{Q}.lora_up.weight": torch.full((8, 4), float("inf"))}),
               ["bad.safetensors", f"{Q}.lora_up.weight", "Inf"]),
    "nan_alpha": (lambda t: write(_f(t), {**good(), f"{Q}.alpha": torch.tensor(float("nan"))}),
                  ["bad.safetensors", f"{Q}.alpha", "NaN"]),
    "negative_alpha": (lambda t: write(_f(t), {**good(), f"{Q}.alpha": torch.tensor(-2.0)}),
                       ["bad.safetensors", Q, "alpha"]),
    "alpha_not_scalar": (lambda t: write(_f(t), {**good(), f"{Q}.alpha": torch.ones(2)}),
                         ["bad.safetensors", Q, "alpha has shape"]),
    "integer_weights": (lambda t: write(_f(t), {**good(), f"{Q}.lora_down.weight": torch.ones(4, 6, dtype=torch.int32)}),
                        ["bad.safetensors", Q, "non-float"]),
    "three_dim_weight": (lambda t: write(_f(t), {**good(), f"{Q}.lora_down.weight": torch.randn(4, 6, 2)}),
                         ["bad.safetensors", Q, "expected 2-D"]),
    "conv_up_with_kernel": (lambda t: write(_f(t), {f"{Q}.lora_down.weight": torch.randn(4, 6, 3, 3),
                                                    f"{Q}.lora_up.weight": torch.randn(8, 4, 3, 3)}),
                            ["bad.safetensors", Q, "kernel"]),
    "unknown_key": (lambda t: write(_f(t), {**good(), "model.diffusion_model.out.2.weight": torch.randn(2)}),
                    ["bad.safetensors", "model.diffusion_model.out.2.weight", "unknown key"]),
    "unknown_prefix": (lambda t: write(_f(t), good(name="lora_vae_decoder_conv_in")),
                       ["bad.safetensors", "lora_vae_decoder_conv_in", "no UNet or text-encoder"]),
    "same_module_twice": (lambda t: write(_f(t), {**good(), **good(
        name="lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"), **good(
        name="lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q")}),
        ["bad.safetensors", "same module", "down_blocks_1"]),
    "loha": (lambda t: write(_f(t), {f"{Q}.hada_w1_a": torch.randn(8, 4), f"{Q}.hada_w1_b": torch.randn(4, 6)}),
             ["bad.safetensors", f"{Q}.hada_w1_a", "LoHa"]),
    "lokr": (lambda t: write(_f(t), {f"{Q}.lokr_w1": torch.randn(2, 2), f"{Q}.lokr_w2": torch.randn(4, 3)}),
             ["bad.safetensors", "LoKr"]),
    "full_diff": (lambda t: write(_f(t), {f"{Q}.diff": torch.randn(8, 6)}),
                  ["bad.safetensors", f"{Q}.diff", "full weight difference"]),
    "dora": (lambda t: write(_f(t), {**good(), f"{Q}.dora_scale": torch.randn(1, 6)}),
             ["bad.safetensors", "dora_scale", "DoRA"]),
    "kohya_and_peft_mixed": (lambda t: write(_f(t), {**good(), "unet.mid_block.attentions.0.proj_in.lora_A.weight":
                                                     torch.randn(2, 6), "unet.mid_block.attentions.0.proj_in"
                                                     ".lora_B.weight": torch.randn(8, 2)}),
                             ["bad.safetensors", "mixes kohya"]),
    "malformed_lora2_ranks": (lambda t: write(_f(t), good(), {"lora2_ranks": "{oops"}),
                              ["bad.safetensors", "lora2_ranks", "not valid JSON"]),
    "lora2_ranks_disagree": (lambda t: write(_f(t), good(), {"lora2_ranks": json.dumps({Q: 16})}),
                             ["bad.safetensors", "lora2_ranks", Q, "rank 16"]),
    "malformed_peft_metadata": (lambda t: write(_f(t), {"unet.mid_block.attentions.0.proj_in.lora_A.weight":
                                                        torch.randn(2, 6), "unet.mid_block.attentions.0.proj_in"
                                                        ".lora_B.weight": torch.randn(8, 2)},
                                                {"lora_adapter_metadata": "not json"}),
                                ["bad.safetensors", "lora_adapter_metadata"]),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    return path


def _append(path, data: bytes):
    path.write_bytes(path.read_bytes() + data)
    return path


def _short_header(path, by: int):
    """The same bytes with the header-length field `by` less (the header must end in that many spaces)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert data[8 + n - by: 8 + n] == b" " * by, "the writer did not pad this header; pick other tensors"
    path.write_bytes(struct.pack("<Q", n - by) + data[8:])
    return path


def _one_line_error(capsys, argv, words, out):
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.count("\n") == 0, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temporary file left


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_fails_every_command_with_one_line(tmp_path, capsys, case):
    build, words = CASES[case]
    path = build(tmp_path)
    out = tmp_path / "out.safetensors"
    _one_line_error(capsys, ["inspect", str(path)], words, out)
    _one_line_error(capsys, ["pad", str(path), "-o", str(out)], words, out)
    other = write(tmp_path / "other.safetensors", good())
    _one_line_error(capsys, ["merge", str(other), str(path), "-o", str(out)], words, out)


def test_table_has_at_least_30_cases():
    assert len(CASES) + len(TOOL_CASES) >= 30


# Bad arguments and incompatible inputs: (argv builder, words)
TOOL_CASES = {
    "merge_different_base_models": (lambda t, a, b: ["merge", a, _base(t, "sd_v1"), "-o", "OUT"],
                                    ["sd15.safetensors", "different base models"]),
    "merge_different_shapes": (lambda t, a, b: ["merge", a, str(write(t / "wide.safetensors", good(out=16))),
                                                "-o", "OUT"], ["wide.safetensors", Q, "shape"]),
    "merge_weight_count": (lambda t, a, b: ["merge", a, b, "-o", "OUT", "--weights", "1"], ["--weights", "1 values"]),
    "merge_one_input": (lambda t, a, b: ["merge", a, "-o", "OUT"], ["at least two"]),
    "merge_resize_pad_average": (lambda t, a, b: ["merge", a, b, "-o", "OUT", "--mode", "pad-average", "--rank", "2"],
                                 ["pad-average"]),
    "pad_below_max": (lambda t, a, b: ["pad", a, "-o", "OUT", "--rank", "2"], ["--rank 2", Q]),
    "truncate_fraction_zero": (lambda t, a, b: ["truncate", a, "-o", "OUT", "--fraction", "0"], ["--fraction"]),
    "truncate_no_budget": (lambda t, a, b: ["truncate", a, "-o", "OUT"], ["one of the arguments"]),
    "truncate_params_too_small": (lambda t, a, b: ["truncate", a, "-o", "OUT", "--params", "3"], ["--params 3"]),
    "resize_energy_above_one": (lambda t, a, b: ["resize", a, "-o", "OUT", "--energy", "1.5"], ["--energy"]),
    "resize_rank_zero": (lambda t, a, b: ["resize", a, "-o", "OUT", "--rank", "0"], ["--rank"]),
    "plot_not_png": (lambda t, a, b: ["plot", a, "-o", "OUT"], ["must end in .png"]),
    "output_not_safetensors": (lambda t, a, b: ["pad", a, "-o", str(t / "out.ckpt")], ["out.ckpt", ".safetensors"]),
    "unknown_dtype": (lambda t, a, b: ["pad", a, "-o", "OUT", "--dtype", "fp8"], ["--dtype"]),
}


def _base(tmp, base):
    return str(write(tmp / "sd15.safetensors", good(), {"ss_base_model_version": base}))


@pytest.mark.parametrize("case", sorted(TOOL_CASES))
def test_bad_arguments_fail_with_one_line_and_no_output(tmp_path, capsys, case):
    a = str(write(tmp_path / "a.safetensors", {**good(), **good(r=2, name=K)}, {"ss_base_model_version": "sdxl_base_v1-0"}))
    b = str(write(tmp_path / "b.safetensors", good(r=6)))
    build, words = TOOL_CASES[case]
    out = tmp_path / ("out.jpg" if case == "plot_not_png" else "out.safetensors")
    argv = [str(out) if x == "OUT" else x for x in build(tmp_path, a, b)]
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # usage errors exit from argparse, still with one line
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_existing_output_is_never_replaced_without_overwrite(tmp_path, capsys):
    a = str(write(tmp_path / "a.safetensors", good()))
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    for argv in (["pad", a, "-o", str(out)], ["truncate", a, "-o", str(out), "--max-rank", "1"],
                 ["resize", a, "-o", str(out), "--rank", "1"], ["merge", a, a, "-o", str(out)]):
        capsys.readouterr()
        assert cli.main(argv) == 1
        assert "--overwrite" in capsys.readouterr().err
        assert out.read_bytes() == b"precious"
    assert cli.main(["pad", a, "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"precious"
