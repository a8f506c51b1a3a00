"""Seeded mutations of small LoRA safetensors files, for fuzzing the adapter reader against the safetensors library.

`make_case(rng)` returns (file bytes, list of the mutations applied).  A case starts from a valid kohya LoRA file
(one to three modules, float factors in fp32/fp16/bf16/fp64, sometimes tensors of other dtypes, sometimes
metadata) kept as a structure that can express what JSON allows and safetensors forbids (a key or field twice,
escaped names, any value in any field), then zero to three mutations are drawn among: the header's structure
(dtypes, shapes, offsets, fields, entries, ``__metadata__``), its text (bytes flipped, inserted or deleted,
whitespace, escapes, deep nesting, -0, lone surrogates), the header-length field, the data (NaN/Inf, random
bytes) and the file's length (truncated, bytes appended).
"""
from __future__ import annotations

import json
import random
import struct

import torch

MODULES = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
           "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k",
           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
           "lora_unet_middle_block_1_proj_in")
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
OTHER_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                "U16": torch.uint16}
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2}


def _tensor_bytes(rng: random.Random, dtype: str, numel: int) -> bytes:
    if dtype in FLOAT_DTYPES:
        g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        t = torch.randn(numel, generator=g).to(FLOAT_DTYPES[dtype])
        return t.view(torch.uint8).numpy().tobytes() if numel else b""
    if dtype == "BOOL":
        return bytes(rng.randrange(2) for _ in range(numel))
    if dtype.startswith("F8"):
        return bytes(rng.choice([0x00, 0x38, 0x40, 0xB8, 0x3C, 0x44]) for _ in range(numel))
    return bytes(rng.randrange(256) for _ in range(numel * SIZES[dtype]))


class Entry:
    """One header entry: the key as JSON text, the fields as (name JSON text, value JSON text) pairs."""

    def __init__(self, key: str, dtype: str, shape: list, data: bytes):
        self.key = json.dumps(key)
        self.name = key
        self.dtype, self.shape, self.data = dtype, shape, data
        self.fields: list[list[str]] | None = None  # set by layout()

    def text(self) -> str:
        return "{" + ", ".join(f"{k}: {v}" for k, v in self.fields) + "}"


class FileModel:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.entries: list[Entry] = []
        modules = rng.sample(MODULES, rng.randint(1, 3))
        for m in modules:
            dt = rng.choice(list(FLOAT_DTYPES))
            r, out, inp = rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 6)
            conv = rng.random() < 0.15
            down = [r, inp, 3, 3] if conv else [r, inp]
            up = [out, r, 1, 1] if conv else [out, r]
            for suffix, shape, d in ((".lora_down.weight", down, dt), (".lora_up.weight", up, dt),
                                     (".alpha", [], rng.choice(["F32", "F32", "F16", dt]))):
                if suffix == ".alpha" and rng.random() < 0.15:
                    continue  # alpha = rank
                numel = 1
                for s in shape:
                    numel *= s
                data = _tensor_bytes(rng, d, numel)
                if suffix == ".alpha":  # a positive alpha, so that the node accepts the unmutated file
                    data = torch.tensor([rng.uniform(0.5, 8.0)]).to(FLOAT_DTYPES[d]).view(torch.uint8).numpy().tobytes()
                self.entries.append(Entry(m + suffix, d, shape, data))
        if rng.random() < 0.2:  # tensors of other dtypes (the node path refuses their keys; the reader must not)
            for i in range(rng.randint(1, 3)):
                d = rng.choice(list(OTHER_DTYPES) + ["F16"])
                shape = rng.choice([[], [0], [3], [2, 2], [1, 5], [0, 4]])
                numel = 1
                for s in shape:
                    numel *= s
                self.entries.append(Entry(f"extra_{i}", d, shape, _tensor_bytes(rng, d, numel)))
        rng.shuffle(self.entries)  # header order; the data order is drawn separately
        self.meta: list[tuple[str, str]] | None = None  # (key text, value text) pairs
        if rng.random() < 0.7:
            self.meta = [(json.dumps("ss_network_module"), json.dumps("networks.lora"))]
            if rng.random() < 0.5:
                ranks = {m: 1 for m in modules}
                self.meta.append((json.dumps("lora2_tag"), json.dumps(json.dumps(ranks))))
            if rng.random() < 0.3:
                self.meta.append((json.dumps("ss_comment"), json.dumps("ünïcode ✓ [{\"}] \\ \n")))
        self.meta_text: list[str] | None = None  # rendered __metadata__ values (more than one: repeated)
        self.lead = ""
        self.pad = rng.random() < 0.7
        self.length_delta = 0
        self.append = b""
        self.cut: int | None = None
        self.order = list(range(len(self.entries)))
        rng.shuffle(self.order)
        self.layout()

    def layout(self) -> None:
        """Byte ranges in data order, and the fields of every entry from them."""
        pos = 0
        self.blob = bytearray()
        for i in self.order:
            e = self.entries[i]
            e.start, e.end = pos, pos + len(e.data)
            self.blob += e.data
            pos = e.end
        for e in self.entries:
            e.fields = [['"dtype"', json.dumps(e.dtype)], ['"shape"', json.dumps(e.shape)],
                        ['"data_offsets"', json.dumps([e.start, e.end])]]
            if self.rng.random() < 0.3:
                self.rng.shuffle(e.fields)
        if self.meta is not None:
            self.meta_text = ["{" + ", ".join(f"{k}: {v}" for k, v in self.meta) + "}"]
        self.meta_at = self.rng.randint(0, len(self.entries))

    def header(self) -> str:
        items = [f"{e.key}: {e.text()}" for e in self.entries]
        for j, m in enumerate(self.meta_text or []):
            items.insert(min(self.meta_at + j, len(items)), f'"__metadata__": {m}')
        return self.lead + "{" + ", ".join(items) + "}"

    def render(self, header_mutator=None) -> bytes:
        text = self.header()
        raw = text.encode("utf-8", "surrogatepass")
        if header_mutator is not None:
            raw = header_mutator(raw)
        if self.pad:
            raw += b" " * (-len(raw) % 8)
        out = struct.pack("<Q", max(0, len(raw) + self.length_delta)) + raw + bytes(self.blob) + self.append
        return out[: self.cut] if self.cut is not None else out


# ------------------------------------------------------------------------------------------------ mutations

def _entry(m: FileModel) -> Entry | None:
    return m.rng.choice(m.entries) if m.entries else None


def _field(e: Entry, name: str) -> list[str] | None:
    for f in e.fields:
        if f[0] == f'"{name}"':
            return f
    return None


def _set(e: Entry, name: str, value: str) -> None:
    f = _field(e, name)
    if f is not None:  # (a field dropped or renamed by an earlier mutation stays so)
        f[1] = value


BAD_VALUES = ['"F17"', '["F32"]', "5", "null", '"f32"', '"C64"', '"F4"', "{}", "true", '"F32 "', "-1", "1.0",
              "[]", "[1]", "[-1]", "[1.0]", "[true]", '"4"', "[4294967296, 0]", "[281474976710656, 0, 1]",
              "[0, 0, 0, 0, 0, 0, 0, 0, 0]", "[[1]]", "[0, 4, 4]", "[4, 0]", "[-0, 4]", "[0, -0]", "NaN",
              "[1e2]", "[18446744073709551616, 0]", '"x" ', "[0,\n4]"]


def mut_field_value(m: FileModel):
    e = _entry(m)
    if e:
        f = m.rng.choice(e.fields)
        f[1] = m.rng.choice(BAD_VALUES)


def mut_dtype_swap(m: FileModel):
    e = _entry(m)
    if e:
        _set(e, "dtype", json.dumps(m.rng.choice(list(SIZES))))


def mut_shape(m: FileModel):
    e = _entry(m)
    if e:
        shape = list(e.shape)
        op = m.rng.randrange(4)
        if op == 0 and shape:
            shape[m.rng.randrange(len(shape))] += m.rng.choice([-1, 1])
        elif op == 1:
            shape.append(1)
        elif op == 2 and shape:
            shape.pop()
        else:
            shape = shape[::-1]
        _set(e, "shape", json.dumps(shape))


def mut_offsets(m: FileModel):
    e = _entry(m)
    if e:
        a, b = e.start, e.end
        d = m.rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
        a, b = m.rng.choice([(a + d, b + d), (a + d, b), (a, b + d), (b, a), (0, b - a)])
        _set(e, "data_offsets", json.dumps([a, b]))


def mut_drop_field(m: FileModel):
    e = _entry(m)
    if e:
        e.fields.pop(m.rng.randrange(len(e.fields)))


def mut_extra_field(m: FileModel):
    e = _entry(m)
    if e:
        e.fields.insert(m.rng.randrange(len(e.fields) + 1), ['"extra"', m.rng.choice(["1", '"x"', "[]", "{}"])])


def mut_repeat_field(m: FileModel):
    e = _entry(m)
    if e:
        f = m.rng.choice(e.fields)
        name = f[0] if m.rng.random() < 0.5 else _escape_one(m.rng, f[0])
        value = f[1] if m.rng.random() < 0.3 else m.rng.choice(BAD_VALUES + [f[1]])
        e.fields.insert(m.rng.randrange(len(e.fields) + 1), [name, value])


def mut_escape_field_name(m: FileModel):
    e = _entry(m)
    if e:
        f = m.rng.choice(e.fields)
        f[0] = _escape_one(m.rng, f[0])


def _escape_one(rng: random.Random, quoted: str) -> str:
    """The same JSON string with one character written as a \\u escape."""
    inner = quoted[1:-1]
    plain = [i for i, c in enumerate(inner) if c not in '\\"']
    if not plain:
        return quoted
    i = rng.choice(plain)
    return '"' + inner[:i] + "\\u%04x" % ord(inner[i]) + inner[i + 1:] + '"'


def mut_escape_key(m: FileModel):
    e = _entry(m)
    if e:
        e.key = _escape_one(m.rng, e.key)


def mut_duplicate_entry(m: FileModel):
    e = _entry(m)
    if e:
        twin = Entry.__new__(Entry)
        twin.__dict__.update(e.__dict__)
        twin.fields = [list(f) for f in e.fields]
        if m.rng.random() < 0.5:
            twin.key = _escape_one(m.rng, e.key)
        m.entries.insert(m.rng.randrange(len(m.entries) + 1), twin)


def mut_drop_entry(m: FileModel):
    if m.entries:
        m.entries.pop(m.rng.randrange(len(m.entries)))


def mut_metadata(m: FileModel):
    m.meta_text = [m.rng.choice(["[]", "[1]", "null", "5", '"x"', '{"a": 1}', '{"a": null}', '{"a": ["b"]}',
                                 '{"a": "1", "a": "2"}', '{"a": "1", "\\u0061": "2"}', "{}",
                                 '{"a": "\\ud800"}', '{"\\udc00": "x"}', '{"a": "\\ud83d\\ude00"}',
                                 '{"a": "b"} ' + "\n"])]


def mut_repeat_metadata(m: FileModel):
    m.meta_text = (m.meta_text or ["{}"]) + [m.rng.choice(["{}", '{"ss_network_dim": "64"}', "null"])]


def mut_whitespace(m: FileModel):
    m.lead = m.rng.choice([" ", "\n", "\t", "\r\n ", "\ufeff", "\x00", "\x0b"])


def mut_length(m: FileModel):
    m.length_delta = m.rng.choice([-16, -8, -5, -4, -3, -2, -1, 1, 2, 3, 4, 8, 1 << 20, 1 << 40, -(1 << 20)])


def mut_append(m: FileModel):
    m.append = bytes(m.rng.randrange(256) for _ in range(m.rng.choice([1, 2, 4, 8, 64])))


def mut_cut(m: FileModel):
    total = 8 + len(m.header().encode("utf-8", "surrogatepass")) + len(m.blob)
    m.cut = m.rng.randrange(0, total + 1)


def mut_data(m: FileModel):
    if not m.blob:
        return
    i = m.rng.randrange(len(m.blob))
    m.blob[i] = m.rng.choice([0x7F, 0xFF, 0x80, 0x00, 0x7C, 0xFE, m.rng.randrange(256)])


def mut_nonfinite(m: FileModel):
    floats = [e for e in m.entries if e.dtype in FLOAT_DTYPES and e.end > e.start]
    if not floats:
        return
    e = m.rng.choice(floats)
    bad = {"F32": [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"], "F16": [b"\x00\x7e", b"\x00\x7c"],
           "BF16": [b"\xc0\x7f", b"\x80\xff"], "F64": [b"\x00" * 6 + b"\xf8\x7f", b"\x00" * 6 + b"\xf0\x7f"]}
    word = m.rng.choice(bad[e.dtype])
    k = m.rng.randrange((e.end - e.start) // len(word))
    m.blob[e.start + k * len(word): e.start + (k + 1) * len(word)] = word


def mut_deep(m: FileModel):
    e = _entry(m)
    if e:
        k = m.rng.choice([4, 9, 50, 3000, 100_000])
        m.rng.choice(e.fields)[1] = "[" * k + "]" * k


def _byte_flip(rng):
    def f(raw: bytes) -> bytes:
        if not raw:
            return raw
        b = bytearray(raw)
        i = rng.randrange(len(b))
        op = rng.randrange(3)
        char = rng.choice(b'{}[]",:-0123456789 \\u\x00\xff\xc3e.')
        if op == 0:
            b[i] = char
        elif op == 1:
            b.insert(i, char)
        else:
            del b[i]
        return bytes(b)
    return f


STRUCTURAL = [mut_field_value, mut_dtype_swap, mut_shape, mut_offsets, mut_drop_field, mut_extra_field,
              mut_repeat_field, mut_escape_field_name, mut_escape_key, mut_duplicate_entry, mut_drop_entry,
              mut_metadata, mut_repeat_metadata, mut_whitespace, mut_length, mut_append, mut_cut, mut_data,
              mut_nonfinite, mut_deep]


def make_case(rng: random.Random) -> tuple[bytes, list[str]]:
    m = FileModel(rng)
    applied: list[str] = []
    n = rng.choice([0, 1, 1, 1, 2, 2, 3])
    for _ in range(n):
        mut = rng.choice(STRUCTURAL + ["bytes"])
        if mut == "bytes":
            applied.append("header_bytes")
        else:
            mut(m)
            applied.append(mut.__name__[4:])
    flips = applied.count("header_bytes")
    mutator = None
    if flips:
        fs = [_byte_flip(rng) for _ in range(flips)]

        def mutator(raw):
            for f in fs:
                raw = f(raw)
            return raw
    return m.render(mutator), applied
