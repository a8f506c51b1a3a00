"""On-disk cache of encoded training data (lora2_train.cache): keys, round trips, and that it never fails a run."""
import logging
import os

import pytest
import torch

from lora2_train.cache import VERSION, EncodeCache, digest, encoder_fingerprint


def test_digest_is_canonical_and_counts_every_byte():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert digest("latent", t, 7) == digest("latent", t.clone(), 7)
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})  # dict order does not count
    u = t.clone()
    u[1, 2] = torch.nextafter(u[1, 2], torch.tensor(100.0))  # one ulp
    keys = {digest(t), digest(u), digest(t.double()), digest(t.reshape(3, 2)), digest(t.T.contiguous())}
    assert len(keys) == 5
    # values of other types never collide (a list and a tuple are one kind: 8 values, 7 keys)
    assert len({digest(v) for v in (1, 1.0, True, "1", b"1", [1], (1,), None)}) == 7
    assert digest(["ab", "c"]) != digest(["a", "bc"])  # lengths are part of the encoding
    with pytest.raises(TypeError, match="cannot digest a object"):
        digest(object())


def test_encoder_fingerprint_is_the_exact_output():
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 1280)
    assert encoder_fingerprint(a, b) == encoder_fingerprint(a.clone(), b.clone())
    assert encoder_fingerprint(a, b) != encoder_fingerprint(a, b * (1 + 1e-6))
    assert encoder_fingerprint(a) != encoder_fingerprint(a.half())


def test_entries_round_trip_and_are_counted(tmp_path):
    cache = EncodeCache(tmp_path / "c")
    key = digest("latent", 1)
    value = {"latent": torch.randn(1, 4, 16, 12), "pooled": torch.randn(1, 1280).half()}
    assert cache.get("latents", key) is None
    cache.put("latents", key, value)
    path = cache.path("latents", key)
    assert path == tmp_path / "c" / "latents" / key[:2] / f"{key}.safetensors" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    again = EncodeCache(tmp_path / "c")
    got = again.get("latents", key)
    assert set(got) == set(value) and all(torch.equal(got[k], value[k]) and got[k].dtype == value[k].dtype
                                          for k in value)
    assert again.get("text", key) is None  # kinds are separate
    assert (cache.hits, cache.misses) == ({}, {"latents": 1})
    assert (again.hits, again.misses) == ({"latents": 1}, {"text": 1})
    assert again.report() == "latents 1 from cache, 0 encoded; text 0 from cache, 1 encoded"
    assert EncodeCache(tmp_path / "c").report() == ""


def test_no_root_reads_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = EncodeCache(None)
    cache.put("latents", "ab" * 32, {"latent": torch.zeros(1)})
    assert cache.get("latents", "ab" * 32) is None and not cache.enabled and cache.report() == ""
    assert list(tmp_path.iterdir()) == []


def test_damaged_or_foreign_entries_are_misses_and_get_rewritten(tmp_path, caplog):
    cache = EncodeCache(tmp_path)
    k1, k2 = digest(1), digest(2)
    cache.put("text", k1, {"cond": torch.ones(2, 3)})
    path = cache.path("text", k1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a half-written file (not ours: ours are atomic)
    with caplog.at_level(logging.WARNING, logger="lora2_train.cache"):
        assert cache.get("text", k1) is None
    assert str(path) in caplog.text and "unusable entry ignored" in caplog.text
    cache.put("text", k1, {"cond": torch.ones(2, 3)})
    assert torch.equal(cache.get("text", k1)["cond"], torch.ones(2, 3))
    # an entry copied under another key's name is not that key's entry
    os.makedirs(cache.path("text", k2).parent, exist_ok=True)
    cache.path("text", k2).write_bytes(path.read_bytes())
    assert cache.get("text", k2) is None


def test_a_failed_write_is_logged_once_and_the_run_goes_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = EncodeCache(blocker)
    with caplog.at_level(logging.WARNING, logger="lora2_train.cache"):
        cache.put("latents", digest(1), {"latent": torch.zeros(2)})
        cache.put("latents", digest(2), {"latent": torch.zeros(2)})
    assert caplog.text.count("not kept on disk") == 1 and not cache.enabled
    assert cache.get("latents", digest(1)) is None  # still usable: every lookup misses
    assert blocker.read_text() == "not a folder"


def test_version_is_part_of_every_key():
    import lora2_train.cache as C

    before = digest("x")
    old, C.VERSION = C.VERSION, VERSION + "-next"
    try:
        assert digest("x") != before
    finally:
        C.VERSION = old
