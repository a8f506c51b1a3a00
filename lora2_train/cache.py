"""On-disk cache of encoded training data: VAE latents and caption embeddings (torch + safetensors only).

An entry is a small safetensors file ``<root>/<kind>/<key[:2]>/<key>.safetensors`` whose name is the SHA-256
of everything its tensors depend on (:func:`digest` of the parts the caller gives, plus :data:`VERSION`).
The caller keys latents by the pixels actually encoded (so the file content, the resize, the bucket and the
crop all count), the encoder and the seed; caption embeddings by the tokens and the encoder.  An encoder is
identified by what it computes (:func:`encoder_fingerprint`: its exact output on a fixed probe input), so
other weights, a LoRA patched into it or another dtype give other keys.

A second run on the same data reads its tensors back instead of encoding them.  The cache never makes a run
fail: an unreadable or foreign entry is ignored (and rewritten), a failed write (full disk, read-only folder)
is logged once and the run goes on without writing.  Entries are written atomically (temporary file, rename),
so a killed run leaves no half entry.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path

import torch

#: changes whenever what an entry holds, or how a key is made, changes: old entries then never match
VERSION = "1"
_KEY_META = "lora2_cache_key"

log = logging.getLogger(__name__)


def _feed(h, obj) -> None:
    """Feed a canonical, type-tagged encoding of `obj` into the hash `h` (nested dict/list/tuple of tensors,
    numbers, strings, bytes, None); dicts in key order."""
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        s = str(obj).encode()
        h.update(b"I" + struct.pack("<Q", len(s)) + s)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        s = obj.encode("utf-8", "surrogatepass")
        h.update(b"S" + struct.pack("<Q", len(s)) + s)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        b = bytes(obj)
        h.update(b"Y" + struct.pack("<Q", len(b)) + b)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(b"T" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<Q", len(obj)))
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L" + struct.pack("<Q", len(obj)))
        for v in obj:
            _feed(h, v)
    else:
        raise TypeError(f"cache key: cannot digest a {type(obj).__name__}")


def digest(*parts) -> str:
    """SHA-256 (hex) of `parts` and :data:`VERSION`: equal parts give equal keys, and a tensor counts by its
    dtype, shape and every byte."""
    h = hashlib.sha256()
    _feed(h, ("lora2-cache", VERSION, parts))
    return h.hexdigest()


def encoder_fingerprint(*outputs) -> str:
    """Key of an encoder: the exact bytes of its `outputs` on a fixed probe input.  Other weights, a LoRA
    patched into it, another dtype or device give another key; a device whose kernels are not bit-for-bit
    repeatable only loses the cache (every entry misses), never gets another encoder's entries."""
    return digest("encoder", [t.detach().to("cpu") for t in outputs])


class EncodeCache:
    """Entries under `root` (None: nothing is read, written or counted; every lookup misses).  Counts its hits
    and misses per kind for the run's report."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root else None
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self._write_failed = False

    @property
    def enabled(self) -> bool:
        return self.root is not None and not self._write_failed

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under `key`, or None (no entry, cache off, or an entry that cannot be read or
        belongs to another key)."""
        if self.root is None:  # no cache: nothing looked up, nothing counted
            return None
        path = self.path(kind, key)
        tensors = self._read(path, key) if path.is_file() else None
        bucket = self.hits if tensors is not None else self.misses
        bucket[kind] = bucket.get(kind, 0) + 1
        return tensors

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store `tensors` (CPU copies) under `key`, atomically; a failure is logged once and turns writing off."""
        if not self.enabled:
            return
        from safetensors.torch import save

        from .format import atomic_write_bytes

        data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                    metadata={_KEY_META: key, "lora2_cache_version": VERSION})
        try:
            atomic_write_bytes(self.path(kind, key), data, overwrite=True)
        except OSError as e:
            self._write_failed = True
            log.warning("LoRA² cache: %s; encoded data of this run is not kept on disk", e)

    def report(self) -> str:
        """'latents 3 read, 1 encoded; text 2 read' style summary ('' when nothing was looked up)."""
        parts = []
        for kind in sorted(set(self.hits) | set(self.misses)):
            h, m = self.hits.get(kind, 0), self.misses.get(kind, 0)
            parts.append(f"{kind} {h} from cache, {m} encoded")
        return "; ".join(parts)

    @staticmethod
    def _read(path: Path, key: str):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get(_KEY_META) != key:
                    raise ValueError("entry of another key")
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a damaged or foreign entry is a miss; it is rewritten after encoding
            log.warning("LoRA² cache: %s: unusable entry ignored (%s)", path, (str(e).splitlines() or [""])[0])
            return None
