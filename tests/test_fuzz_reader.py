"""Fuzzing the adapter reader against the safetensors library (seeded mutations, see fuzz_safetensors.py).

Every mutated file goes through three readers: ``read_safetensors(mapped=True)`` (the CLI tools' path),
``read_safetensors(mapped=False)`` and the Load LoRA² Adapter node's own reader (``LoadLoRA2Adapter._read``, the
pack loaded as ComfyUI loads it, no server).  Each must either accept the file with exactly what the safetensors
library reads (same keys, dtypes, shapes and bytes, same metadata; for the node, the modules that
``readers.normalize`` makes of the library's tensors), or refuse it with one AdapterFormatError line naming
the file — never another exception, a hang (10 s per case), or tensors larger than the file.  A sample of the
refused files also goes through ``lora2_train pad``: one stderr line, no output file, no temporary file.

CI runs LORA2_FUZZ_CASES=2000 (the default) from LORA2_FUZZ_SEED=0; by hand, e.g.
``LORA2_FUZZ_CASES=100000 LORA2_FUZZ_SEED=7 python -m pytest -q -s tests/test_fuzz_reader.py``.
"""
import collections
import os
import random
import signal
import sys

import pytest
import torch
from safetensors import safe_open

from fuzz_safetensors import STRUCTURAL, make_case
from lora2_train import cli
from lora2_train.format import AdapterFormatError, read_safetensors
from lora2_train.readers import normalize
from tests_helpers import pack_module

CASES = int(os.environ.get("LORA2_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("LORA2_FUZZ_SEED", "0"))
CLI_EVERY = 20  # every 20th case also through `lora2_train pad`


def _library(path):
    """(tensors, metadata) as the safetensors library reads the file, or None where it refuses it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception:  # the library raises several types for a bad file; any of them is a refusal
        return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _refusal(e: AdapterFormatError, path) -> str:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


@pytest.fixture(scope="module")
def node_loader():
    with pack_module("lora2_fuzz_pack"):
        yield sys.modules["lora2_fuzz_pack.nodes.load"].LoadLoRA2Adapter


def test_reader_accepts_what_safetensors_reads_or_refuses_in_one_line(tmp_path, capsys, node_loader):
    rng = random.Random(SEED)
    counts = collections.Counter()
    seen_mutations = collections.Counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(CASES):
            data, applied = make_case(rng)
            seen_mutations.update(applied)
            path = tmp_path / f"case{i}.safetensors"
            path.write_bytes(data)
            where = f"case {i} (seed {SEED}, mutations {applied})"
            signal.alarm(10)
            try:
                _check_case(path, node_loader, counts, where)
                if i % CLI_EVERY == 0:
                    _check_cli(path, tmp_path, capsys, counts, where)
            except _Timeout:
                pytest.fail(f"{where}: took over 10 s")
            finally:
                signal.alarm(0)
            path.unlink()
    finally:
        signal.signal(signal.SIGALRM, old)
    summary = (f"fuzz: {CASES} cases tried (seed {SEED}); reader: {counts['refused']} refused, "
               f"{counts['accepted']} accepted and identical to safetensors "
               f"({counts['library_refused']} of all refused by safetensors itself); "
               f"node: {counts['node_refused']} refused, {counts['node_accepted']} accepted and identical; "
               f"CLI pad: {counts['cli_refused']} refused with no output, {counts['cli_written']} written")
    print(summary)
    with capsys.disabled():
        sys.stdout.write("\n" + summary + "\n")
    # the generator must reach both outcomes and every mutation, or the test proves little
    assert counts["accepted"] >= CASES // 10 and counts["refused"] >= CASES // 3, summary
    assert counts["node_accepted"] >= CASES // 20, summary
    if CASES >= 1000:
        assert {m.__name__[4:] for m in STRUCTURAL} | {"header_bytes"} <= set(seen_mutations), seen_mutations


def _check_case(path, node_loader, counts, where):
    lib = _library(path)
    counts["library_refused"] += lib is None
    outcomes = []
    for mapped in (True, False):
        try:
            tensors, meta = read_safetensors(path, mapped=mapped)
        except AdapterFormatError as e:
            outcomes.append(("refused", _refusal(e, path)))
            continue
        assert lib is not None, f"{where}: accepted (mapped={mapped}) a file safetensors refuses"
        lib_tensors, lib_meta = lib
        assert set(tensors) == set(lib_tensors), f"{where}: keys differ from safetensors'"
        for k, t in tensors.items():
            assert _same_tensor(t, lib_tensors[k]), f"{where}: tensor {k!r} differs from safetensors' (mapped={mapped})"
        assert meta == lib_meta, f"{where}: metadata differs from safetensors'"
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= path.stat().st_size, where
        outcomes.append(("accepted", None))
    assert outcomes[0][0] == outcomes[1][0], f"{where}: the mapped and copying reads disagree: {outcomes}"
    counts[outcomes[0][0]] += 1
    try:
        adapter = node_loader()._read(str(path))
    except AdapterFormatError as e:
        _refusal(e, path)
        counts["node_refused"] += 1
        return
    assert lib is not None and outcomes[0][0] == "accepted", f"{where}: the node accepted a file the reader refuses"
    modules, _ = normalize(path, *lib)
    assert set(adapter.modules) == set(modules), where
    for k, m in adapter.modules.items():
        ref = modules[k]
        assert _same_tensor(m.down, ref.down) and _same_tensor(m.up, ref.up) and m.alpha == ref.alpha, (where, k)
    assert adapter.metadata == lib[1], where
    counts["node_accepted"] += 1


def _check_cli(path, tmp_path, capsys, counts, where):
    out = tmp_path / "out.safetensors"
    capsys.readouterr()
    rc = cli.main(["pad", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    if rc == 0:
        counts["cli_written"] += 1
        assert read_safetensors(out)[0], where
        out.unlink()
    else:
        counts["cli_refused"] += 1
        assert err.count("\n") == 0 and str(path) in err, (where, err)
        assert not out.exists(), where
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], f"{where}: temporary file left"
