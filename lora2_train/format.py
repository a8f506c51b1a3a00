"""LoRA² adapter files: standard kohya LoRA safetensors with ragged ranks (spec §5).

Keys per module ``<name>``: ``<name>.lora_down.weight`` (D×in[×k×k]),
``<name>.lora_up.weight`` (out×D[×1×1]) and ``<name>.alpha`` (fp32 scalar; ΔW =
alpha/D · up @ down).  Files we train (and the SVD, merge and truncate tools)
give every module the same alpha = max rank (= ``ss_network_alpha``), with s·Λ and
the factor D/alpha split between ``lora_down`` and ``lora_up`` (balanced factors, so fp16 files keep
their precision; in fp16 a module whose balanced factors would still fall below fp16's normal range gets
factors·2^k and its own alpha·4^-k, :func:`factors_for_dtype`): loaders that assume one alpha per file
(diffusers) then scale every module correctly, and the others read per-module
alphas anyway.  Positions stay in importance order: the first k positions of
a module are its k most important directions (``lora2_order`` says which order
a file's positions follow).  Metadata: the ``ss_*`` keys kohya tools read plus
``lora2_version``, ``lora2_ranks``, ``lora2_nu``, ``lora2_config`` (JSON).

Reading validates the safetensors header before any tensor is touched, never
unpickles anything, and normalizes the adapters other tools write (kohya
LoRA/LoCon, diffusers/PEFT, LyCORIS LoCon) into one ragged representation
(see :mod:`lora2_train.readers`).
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .adapter import DTYPES, ORDERS, Adapter, AdapterFormatError, LoRAModule, _dtype_name  # noqa: F401 (re-exported)
from .readers import normalize

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FORMAT_VERSION = "1"
NETWORK_MODULE = "networks.lora"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
#: header bytes read and parsed at most (an SDXL adapter's header is ~0.3 MB; parsing a hostile header of this
#: size allocates a few hundred MB of Python objects at worst; the safetensors library allows 100 MB)
_MAX_HEADER = 16 * 1024 * 1024
_MAX_DIMS = 8  # dimensions of one tensor
_MAX_ELEMENTS = 2 ** 48  # elements of one tensor (zero-size dimensions left out), before any byte is read
_ENTRY_FIELDS = frozenset(("dtype", "shape", "data_offsets"))
_NEGATIVE_ZERO = re.compile(r"-0(?![.eE])")
_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a UTF-16 surrogate escape (paired or not: checked then)
_JSON_METADATA = ("lora2_ranks", "lora2_nu", "lora2_config", "ss_network_args", "lora2_merge")


def balanced_factors(down: torch.Tensor, up: torch.Tensor, c: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down', up') with up'·down' = up·diag(c)·down and both factors of each position equally large.

        g_k = √(c_k · ‖u_k‖ / ‖d_k‖),   d'_k = g_k · d_k,   u'_k = (c_k / g_k) · u_k   (‖d'_k‖ = ‖u'_k‖)

    A scale (Λ, s, D/alpha) folded into one factor alone can push a small-rank module's values into
    fp16's subnormal range; split this way, each stored factor keeps its full relative precision
    (spec §5).  Positions whose column of `up` is zero contribute nothing and keep their row of
    `down`.  Computed in fp32; positions keep their order.
    """
    d, u = down.float(), up.float()
    r = d.shape[0]
    c = torch.as_tensor(c, dtype=torch.float32, device=d.device).expand(r)
    dn = d.reshape(r, -1).norm(dim=1)
    un = u.transpose(0, 1).reshape(r, -1).norm(dim=1)
    live = (un > 0) & (dn > 0) & (c != 0)
    g = torch.where(live, (c.abs() * un / torch.where(live, dn, 1.0)).sqrt(), torch.ones_like(c))  # 1 where dead
    shape_d = (r,) + (1,) * (d.dim() - 1)
    shape_u = (1, r) + (1,) * (u.dim() - 2)
    return d * g.view(shape_d), u * (c / g).view(shape_u)


#: positions whose two factors differ in norm by more than this ratio are rebalanced before a narrowing cast
_BALANCE_RATIO = 4.0
#: a 16-bit file's factors are kept between 16× the dtype's smallest normal number (RMS of the entries; below
#: it fp16's subnormal spacing, 2^-24, starts to cost relative precision) and 1/16 of its largest number
_RANGE_MARGIN = 16.0


def _narrows(src: torch.dtype, dst: torch.dtype) -> bool:
    """A cast from `src` to the 16-bit float `dst` loses range or precision (fp32/fp64 to fp16/bf16, or fp16 ↔ bf16)."""
    return src != dst and dst in (torch.float16, torch.bfloat16) and src.is_floating_point


def balanced_for_cast(down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as they go into a 16-bit file: unchanged when every position's ‖u_k‖ and ‖d_k‖ are within
    a factor 4 of each other (already balanced, e.g. by the training writer), otherwise
    :func:`balanced_factors` with c = 1 (same product, computed in fp32).  A plain kohya file keeps its scale
    in ``lora_up`` (entries ~1e-4 or less), and the tools fold their weights and alpha factors there too;
    cast as they are, such factors fall into fp16's subnormal range."""
    r = down.shape[0]
    if r == 0:
        return down, up
    dn = down.float().reshape(r, -1).norm(dim=1)
    un = up.float().transpose(0, 1).reshape(r, -1).norm(dim=1)
    live = (dn > 0) & (un > 0)
    ratio = torch.where(live, un / torch.where(live, dn, 1.0), torch.ones_like(dn))
    if bool(((ratio > _BALANCE_RATIO) | (ratio < 1.0 / _BALANCE_RATIO)).any()):
        return balanced_factors(down, up, 1.0)
    return down, up


def _range_shift(down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> int:
    """k such that 2^k·down and 2^k·up sit well inside `dtype`'s normal range: the RMS of each factor's
    live positions (both factors nonzero) at least ``_RANGE_MARGIN``·tiny, the largest entry at most
    max/``_RANGE_MARGIN``; 0 when they already do (or nothing is live)."""
    r = down.shape[0]
    d, u = down.float().reshape(r, -1), up.float().transpose(0, 1).reshape(r, -1)
    dn2, un2 = d.square().sum(1), u.square().sum(1)
    live = (dn2 > 0) & (un2 > 0)
    n = int(live.sum())
    if n == 0:
        return 0
    info = torch.finfo(dtype)
    low = min(float(dn2[live].sum()) / (n * d.shape[1]), float(un2[live].sum()) / (n * u.shape[1])) ** 0.5
    high = max(float(d.abs().max()), float(u.abs().max()))
    floor, ceil = _RANGE_MARGIN * info.tiny, info.max / _RANGE_MARGIN
    if low < floor:
        return max(0, min(math.ceil(math.log2(floor / low)), math.floor(math.log2(ceil / high))))
    if high > ceil:
        return -math.ceil(math.log2(high / ceil))
    return 0


def factors_for_dtype(down: torch.Tensor, up: torch.Tensor, alpha: float,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of the same ΔW as stored in `dtype`, each factor rounded once from fp32.

    On a narrowing cast (to fp16/bf16) the factors are balanced first (:func:`balanced_for_cast`).  When
    even balanced factors fall outside `dtype`'s normal range — in fp16, a small-rank module of a file
    whose one alpha is a large max rank, or a lora_up of ~1e-5 — both are multiplied by 2^k and alpha by
    4^-k (exact in binary), so that module's alpha departs from the file's one alpha; bf16 (fp32's range)
    never needs it.  Called by every writer (:func:`adapter_state_dict`) and by the merge's in-memory cast.
    """
    if not (_narrows(down.dtype, dtype) or _narrows(up.dtype, dtype)):
        return down.to(dtype), up.to(dtype), alpha
    down, up = balanced_for_cast(down, up)
    k = _range_shift(down, up, dtype) if down.shape[0] else 0
    if k:
        down, up, alpha = down.float() * 2.0 ** k, up.float() * 2.0 ** k, alpha * 4.0 ** -k
    return down.to(dtype), up.to(dtype), alpha


def uniform_alpha(modules: dict[str, LoRAModule]) -> dict[str, LoRAModule]:
    """The same ΔW with one alpha for all modules, A = max rank: up'·down' = (alpha/A)·up·down,
    the factor alpha/A split between the two (:func:`balanced_factors`)."""
    if not modules:
        return modules
    a = float(max(m.rank for m in modules.values()))
    out = {}
    for k, m in modules.items():
        factor = m.alpha / a
        out[k] = m if factor == 1.0 else LoRAModule(*balanced_factors(m.down, m.up, factor), a)
    return out


def adapter_from_network(network, config=None, base_model: str = "sdxl_base_v1-0", extra: dict | None = None) -> Adapter:
    """Every component of a LoRA2Network as kohya factors with one alpha A = max rank (spec §5):
    up'·down' = (D/A)·s·B·Λ·A_ℓ, the per-position scale (D/A)·s·Λ_k split between the two factors
    (:func:`balanced_factors`); plus the metadata of spec §5."""
    a = float(max(layer.rank for layer in network.layers.values()))
    modules = {}
    for key, layer in network.layers.items():
        with torch.no_grad():
            c = layer.lam().detach().float() * (layer.scale * layer.rank / a)
        down, up = balanced_factors(layer.lora_down.detach(), layer.lora_up.detach(), c)
        modules[key] = LoRAModule(down, up, a)
    cfg = dict(config.to_dict() if config is not None else {})
    cfg.update(extra or {})
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_base_model_version": base_model,
        "ss_network_args": json.dumps({"algo": "lora2", "ragged_ranks": "true"}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "lora2_version": FORMAT_VERSION,
        "lora2_order": "importance",
        "lora2_nu": json.dumps({k: round(v, 8) for k, v in network.nus().items()}),
        "lora2_config": json.dumps(cfg, default=str),
    }
    return with_rank_metadata(Adapter(modules, meta))


def with_rank_metadata(adapter: Adapter, **extra: str) -> Adapter:
    """Refresh the metadata that depends on the ranks (``ss_network_dim`` = max rank, ``lora2_ranks``)."""
    ranks = adapter.ranks()
    max_rank = max(ranks.values()) if ranks else 0
    meta = dict(adapter.metadata)
    meta.update({"ss_network_dim": str(max_rank), "ss_network_alpha": str(max_rank),
                 "lora2_version": FORMAT_VERSION, "lora2_ranks": json.dumps(ranks)})
    meta.setdefault("ss_network_module", NETWORK_MODULE)
    meta.update(extra)
    return Adapter(adapter.modules, meta, adapter.source)


def adapter_state_dict(adapter: Adapter, dtype: str | None = "fp16",
                       contiguous: bool = True) -> dict[str, torch.Tensor]:
    """kohya tensors of an adapter; `dtype` None keeps each tensor's dtype.  alpha is always fp32.

    `contiguous` False leaves views as they are (a truncated module's ``up[:, :k]``) for consumers that
    do not serialize them, such as ComfyUI's LoRA patches.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    sd = {}
    for name, m in adapter.modules.items():
        dt = DTYPES[dtype] if dtype is not None else m.down.dtype
        down, up, alpha = factors_for_dtype(m.down.detach(), m.up.detach(), float(m.alpha), dt)
        down, up = down.to("cpu"), up.to("cpu")
        sd[f"{name}.lora_down.weight"] = down.contiguous() if contiguous else down
        sd[f"{name}.lora_up.weight"] = up.contiguous() if contiguous else up
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return sd


def _atomic(path: str | os.PathLike, write, overwrite: bool) -> Path:
    """Write to a temporary file beside `path`, then move it to `path`: a reader never sees half a file, and a
    failure or a kill at any point leaves the old file (or no file) and at most a stale temporary file, which
    the next write to that folder under the same name removes.

    `write(tmp, fd)` fills the temporary file (by its name or through the open descriptor `fd`).  Without
    `overwrite` the file is created with a hard link, which fails if `path` exists, even if another process
    created it a moment ago; so of two writers of one new name, one wins and the other gets FileExistsError.
    When a file is replaced, the new data is flushed (fsync) before the rename, so a crash of the machine
    leaves either the old file or the new one.  A new name has nothing to lose, so it is not flushed.
    A failed write (full disk, I/O error) raises OSError naming `path`.
    """
    path = Path(path)
    replacing = path.exists()
    if replacing and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = _locked_temporary(path)
    try:
        try:
            write(tmp, fd)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
            if replacing:
                os.fsync(fd)
        except (OSError, SafetensorError) as e:
            what = "the existing file is unchanged" if replacing else "nothing was written"
            cause = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
            raise OSError(getattr(e, "errno", None) or errno.EIO, f"{path}: writing failed ({cause}); {what}") from e
        if overwrite:
            os.replace(tmp, path)
        else:
            _create_from(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)  # (releases the lock that marks the temporary file as being written)
    return path


def _temporary_pattern(path: Path) -> re.Pattern:
    """Names of the temporary files of writes to `path` (mkstemp: prefix, 8 random characters, suffix)."""
    return re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]{8}\.tmp")


def _locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path`, locked (flock) while it is written so that no other writer's
    clean-up (:func:`_remove_stale_temporaries`) takes it for the leftover of a killed process."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits if a clean-up holds it this instant, then sees it unlinked
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary files of earlier writes to `path` whose writer is gone (killed, machine crashed): a
    writer holds a lock on its temporary file until it is renamed, and the kernel drops the lock when the
    writer dies.  Without flock (Windows) nothing is removed."""
    if fcntl is None:
        return
    pattern = _temporary_pattern(path)
    try:
        names = [n for n in os.listdir(path.parent) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        stale = path.parent / name
        try:
            fd = os.open(stale, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: another writer is busy with it
            os.close(fd)
            continue
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(stale)):
                os.unlink(stale)
        except OSError:
            pass
        finally:
            os.close(fd)


def _create_from(tmp: str, path: Path) -> None:
    """Give the complete file `tmp` the name `path` only if no file has it (atomically, by a hard link)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)") from None
    except OSError:  # a file system without hard links (FAT, some network shares): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_WRITE_CHUNK = 16 * 1024 * 1024


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write via a temporary file in the same folder and rename (see :func:`_atomic`)."""
    def write(tmp, fd):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:_WRITE_CHUNK]):]
    return _atomic(path, write, overwrite)


def save_adapter(adapter: Adapter, path: str | os.PathLike, dtype: str | None = "fp16",
                 overwrite: bool = False) -> Path:
    """Write a kohya-format safetensors file atomically; refuses to replace a file unless `overwrite`.

    `dtype` is fp32/fp16/bf16, or None to keep the dtype the factors have.
    """
    if not adapter.modules:
        raise ValueError(f"{path}: the adapter has no modules; nothing to write")
    sd = adapter_state_dict(adapter, dtype)
    meta = {k: str(v) for k, v in adapter.metadata.items()}
    meta["lora2_dtype"] = dtype or _dtype_name(next(iter(adapter.modules.values())).down.dtype)
    return _atomic(path, lambda tmp, fd: save_file(sd, tmp, metadata=meta), overwrite)


def output_path(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """`folder`/`name` + suffix, refusing names that are empty, absolute, or that leave `folder`."""
    raw = str(name).strip()
    if not raw or raw in (".", ".."):
        raise ValueError(f"output name {name!r} is empty")
    if os.path.isabs(raw) or "\\" in raw or any(part == ".." for part in raw.split("/")) or "\0" in raw:
        raise ValueError(f"output name {name!r} must stay inside {folder}")
    if not raw.lower().endswith(suffix):
        raw += suffix
    base = Path(folder).resolve()
    path = (base / raw).resolve()
    if base != path.parent and base not in path.parents:
        raise ValueError(f"output name {name!r} must stay inside {folder}")
    return path


# ---------------------------------------------------------------------------------------------- reading


class _Repeated(dict):
    """A header object that repeats a key; kept (with the key) so that the error can name its parent."""

    repeated: str


def _strict_object(pairs: list) -> dict:
    """``object_pairs_hook`` of the header parse: every object, at every level, is checked for a repeated
    key by the decoded name (``"a"`` and ``"\\u0061"`` are the same key)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        for k, _ in pairs:
            if k in seen:
                obj = _Repeated(obj)
                obj.repeated = k
                break
            seen.add(k)
    return obj


def _short(value, limit: int = 60) -> str:
    """repr of a header value cut to one short line (a hostile header may hold megabytes in one field)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _parse_header(path: Path, raw: bytes) -> dict:
    """The header as a dict, from one strict JSON pass: a key repeated in any object is marked by
    :func:`_strict_object` and refused with its parent's name; nesting deeper than the interpreter's recursion
    limit stops the parse (the checks after it allow no more than the 3 levels of a safetensors header)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterFormatError(f"{path}: header is not UTF-8 text (not a safetensors file?)") from None
    # JSON -0 is the integer 0 for Python but not an integer for safetensors: decode it as the float -0.0,
    # which the checks below refuse like any non-integer (only when "-0" occurs: a hook per number costs)
    parse_int = _int_not_negative_zero if _NEGATIVE_ZERO.search(text) else None
    try:
        header = json.loads(text, object_pairs_hook=_strict_object, parse_int=parse_int)
    except RecursionError:
        raise AdapterFormatError(f"{path}: header nests too deeply (a safetensors header nests 3 levels)") from None
    except ValueError:
        raise AdapterFormatError(f"{path}: header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: header is not a JSON object")
    if isinstance(header, _Repeated):
        raise AdapterFormatError(f"{path}: header has a duplicate key {header.repeated!r} (two tensors or two "
                                 "__metadata__ of that name)")
    if _LONE_SURROGATE.search(text):  # \ud800-style escapes: Python decodes a lone one, safetensors refuses it
        for s in _header_strings(header):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise AdapterFormatError(f"{path}: header key or value {_short(s)} holds an unpaired UTF-16 "
                                         "surrogate escape") from None
    return header


def _int_not_negative_zero(s: str):
    return -0.0 if s == "-0" else int(s)


def _header_strings(header: dict):
    for key, info in header.items():
        yield key
        if isinstance(info, dict):
            for k, v in info.items():
                yield k
                if isinstance(v, str):
                    yield v


def read_safetensors(path: str | os.PathLike, mapped: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, after checking its header against the file.

    `mapped`: the tensors are views of a private memory map of the file instead of copies (one pass
    less over the data; for short-lived processes such as the CLI — a file truncated in place while
    mapped would fault).

    What is accepted is exactly what the ``safetensors`` library reads (same keys, bytes and metadata); what
    is refused raises one :class:`AdapterFormatError` line naming the file and the key: pickle files (never
    unpickled); truncated files; a header longer than the file or than 16 MB, not UTF-8, not JSON or nested deeper
    than an entry's fields; a key repeated at any level (tensors, ``__metadata__``, the fields of an entry,
    metadata keys), however it is escaped; an entry whose fields are not exactly dtype/shape/data_offsets, with
    an unknown dtype, a shape that is not at most 8 non-negative integers of at most 2^48 elements, or a byte
    range that does not match its shape and dtype; byte ranges that do not tile the data section exactly
    (from byte 0 to the end of the file, no overlap, no gap, nothing after the last tensor — so a header length
    that is off by a few bytes is caught); ``__metadata__`` that is not an object (or null) of strings;
    non-finite floating-point tensors; and a file that is replaced or rewritten while it is read.  Every limit
    is checked before any tensor byte is read or any tensor allocated.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFormatError(f"{path}: {path.suffix} files are pickles, which are never loaded; "
                                 "convert it to .safetensors first")
    if path.suffix.lower() != ".safetensors":
        raise AdapterFormatError(f"{path}: only .safetensors adapters are read")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    stamp = _stamp(path)
    size = stamp[1]
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFormatError(f"{path}: truncated file ({size} bytes), no safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise AdapterFormatError(f"{path}: not a safetensors file or truncated "
                                     f"(header length {n} but the file has {size} bytes)")
        if n > _MAX_HEADER:
            raise AdapterFormatError(f"{path}: header length {n} exceeds the limit of {_MAX_HEADER} bytes")
        raw = f.read(n)
    header = _parse_header(path, raw)
    meta = header.pop("__metadata__", None)
    if meta is None:  # absent, or JSON null: no metadata (as safetensors reads it)
        meta = {}
    elif not isinstance(meta, dict):
        raise AdapterFormatError(f"{path}: header key '__metadata__' is not an object ({type(meta).__name__})")
    elif isinstance(meta, _Repeated):
        raise AdapterFormatError(f"{path}: metadata has a duplicate key {meta.repeated!r}")
    for k, v in meta.items():
        if type(v) is not str:
            raise AdapterFormatError(f"{path}: metadata key {k!r} is not a string")
    data_len = size - 8 - n
    for key, info in header.items():
        _check_entry(path, key, info, data_len)
    ordered = sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))  # empty tensors first
    pos = 0  # the byte ranges tile the data section exactly: no overlap, no gap, nothing after the last one
    for key, info in ordered:
        if info["data_offsets"][0] != pos:
            raise AdapterFormatError(f"{path}: tensor {key!r} starts at byte {info['data_offsets'][0]}, "
                                     f"expected {pos} (overlapping or gapped byte ranges)")
        pos = info["data_offsets"][1]
    if pos != data_len:
        last = f"the last tensor {ordered[-1][0]!r}" if ordered else "the header (no tensors)"
        raise AdapterFormatError(f"{path}: {data_len - pos} bytes follow {last}: the data section has "
                                 f"{data_len} bytes, the tensors cover {pos} (wrong header length or appended "
                                 "bytes)")
    runs = _float_runs(ordered)
    try:
        buf = _map(path)
        if mapped:
            tensors = _mapped_tensors(buf, header, 8 + n)
            bad_runs = _non_finite_runs(buf, runs, 8 + n)
        else:
            # The value scan runs over the mapped file in a second thread (one reduction per run, no GIL held)
            # while this one copies the tensors out: the scan costs next to nothing on top of the copy.
            # (safetensors maps the file as well, so a file truncated in place meanwhile faults either way.)
            with ThreadPoolExecutor(max_workers=1) as pool:
                scan = pool.submit(_non_finite_runs, buf, runs, 8 + n)
                with safe_open(str(path), framework="pt") as f:
                    tensors = {key: f.get_tensor(key) for key in header}
                bad_runs = scan.result()
            del buf
    except Exception as e:  # safetensors raises several types for a damaged file
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise AdapterFormatError(f"{path}: not a readable safetensors file ({msg})") from None
    if _stamp(path) != stamp:
        raise AdapterFormatError(f"{path}: the file was replaced or changed while it was read; load it again")
    suspects = [k for i in bad_runs for k in runs[i][3]]  # then name the tensor; fp8 and the like one by one
    suspects += [k for k, t in tensors.items() if t.is_floating_point() and header[k]["dtype"] not in _SCANNED]
    for key in suspects:
        t = tensors[key]
        if not _all_finite(t):
            bad = "NaN" if bool(torch.isnan(t.float()).any()) else "Inf"
            raise AdapterFormatError(f"{path}: tensor {key!r} contains {bad} values")
    return tensors, meta


_TORCH_DTYPES = {name: dt for name, dt in (
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
    ("BOOL", torch.bool), ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
    ("F8_E5M2", getattr(torch, "float8_e5m2", None)), ("U16", getattr(torch, "uint16", None)),
    ("U32", getattr(torch, "uint32", None)), ("U64", getattr(torch, "uint64", None))) if dt is not None}
_SCANNED = ("F64", "F32", "F16", "BF16")  # float dtypes whose bytes are scanned in place (aminmax)
_REDUCIBLE = tuple(_TORCH_DTYPES[d] for d in _SCANNED)  # the torch dtypes aminmax takes as they are


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _map(path: Path):
    """A copy-on-write memory map of the whole file (writable, so torch views of it need no copy)."""
    import mmap

    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _float_runs(ordered) -> list[tuple[torch.dtype, int, int, list[str]]]:
    """Maximal runs of adjacent tensors of one scanned float dtype: (dtype, first byte, end byte, keys).

    safetensors writers group tensors by dtype, so a file has about one run per dtype.
    """
    runs: list = []
    for key, info in ordered:
        if info["dtype"] not in _SCANNED:
            continue
        dtype = _TORCH_DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        if runs and runs[-1][0] == dtype and runs[-1][2] == a:
            runs[-1][2] = b
            runs[-1][3].append(key)
        else:
            runs.append([dtype, a, b, [key]])
    return [tuple(r) for r in runs]


def _non_finite_runs(buf, runs, start: int) -> list[int]:
    """Indices of the runs whose values include a NaN or ±Inf (one aminmax per run over the file's bytes)."""
    bad = []
    for i, (dtype, a, b, _) in enumerate(runs):
        count = (b - a) // dtype.itemsize
        if count and not _all_finite(torch.frombuffer(buf, dtype=dtype, count=count, offset=start + a)):
            bad.append(i)
    return bad


def _mapped_tensors(buf, header: dict, start: int) -> dict[str, torch.Tensor]:
    """Views of the mapped file (byte ranges already checked against its size)."""
    out = {}
    for key, info in header.items():
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"dtype {info['dtype']} is not supported")
        a, b = info["data_offsets"]
        count = (b - a) // _ST_DTYPES[info["dtype"]]
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + a) if count else torch.empty(0, dtype=dtype)
        out[key] = flat.reshape(info["shape"])
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf: aminmax propagates NaN, and ±Inf shows as the min or max.

    (One vectorized pass; ``isfinite`` is two orders of magnitude slower on fp16 CPU tensors.)
    """
    if t.numel() <= 1:
        return t.numel() == 0 or math.isfinite(float(t))
    if t.dtype not in _REDUCIBLE:
        t = t.float()  # fp8 and the like
    lo, hi = torch.aminmax(t.reshape(-1))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _check_entry(path: Path, key: str, info, data_len: int) -> None:
    """One tensor entry: exactly dtype/shape/data_offsets, each well-typed and within the limits, and a byte
    range that matches the shape and lies inside the data section (all checked before anything is read)."""
    if not isinstance(info, dict):
        raise AdapterFormatError(f"{path}: header entry {key!r} is not an object")
    if isinstance(info, _Repeated):
        raise AdapterFormatError(f"{path}: header entry {key!r} has a duplicate field {info.repeated!r}")
    if info.keys() != _ENTRY_FIELDS:
        missing = sorted(_ENTRY_FIELDS - info.keys())
        what = f"lacks {'/'.join(missing)}" if missing else \
            f"has the unknown field {_short(sorted(info.keys() - _ENTRY_FIELDS)[0])}"
        raise AdapterFormatError(f"{path}: header entry {key!r} {what} (expected dtype/shape/data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if type(dtype) is not str or dtype not in _ST_DTYPES:
        raise AdapterFormatError(f"{path}: tensor {key!r} has unknown dtype {_short(dtype)}")
    if not (type(shape) is list and len(shape) <= _MAX_DIMS and all(type(d) is int and d >= 0 for d in shape)):
        raise AdapterFormatError(f"{path}: tensor {key!r} has an invalid shape {_short(shape)} "
                                 f"(expected at most {_MAX_DIMS} non-negative integers)")
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise AdapterFormatError(f"{path}: tensor {key!r} has shape {_short(shape)}, more than "
                                 f"2^{_MAX_ELEMENTS.bit_length() - 1} elements")
    if not (type(offsets) is list and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise AdapterFormatError(f"{path}: tensor {key!r} has invalid data_offsets {_short(offsets)}")
    need = math.prod(shape) * _ST_DTYPES[dtype]
    if offsets[1] - offsets[0] != need:
        raise AdapterFormatError(f"{path}: tensor {key!r}: header gives {offsets[1] - offsets[0]} bytes "
                                 f"for shape {shape} {dtype} ({need} bytes)")
    if offsets[1] > data_len:
        raise AdapterFormatError(f"{path}: tensor {key!r} lies past the end of the file (truncated file?)")


def parse_json_metadata(path, meta: dict[str, str]) -> dict[str, object]:
    """Decode the JSON-valued metadata keys; a malformed value is an error naming its key."""
    out = {}
    for k in _JSON_METADATA:
        if k in meta:
            try:
                out[k] = json.loads(meta[k])
            except json.JSONDecodeError:
                raise AdapterFormatError(f"{path}: metadata key {k!r} is not valid JSON") from None
    return out


def load_adapter(path: str | os.PathLike, mapped: bool = False) -> Adapter:
    """Read a LoRA safetensors file (kohya LoRA/LoCon, LoRA², diffusers/PEFT, LyCORIS LoCon).

    Ranks may differ per module.  A missing ``alpha`` means alpha = rank (kohya convention).
    Algorithms that are not one factor pair per module (LoHa, LoKr, full diff, …) are refused.
    `mapped`: see :func:`read_safetensors`.
    """
    tensors, meta = read_safetensors(path, mapped=mapped)
    modules, source = normalize(path, tensors, meta)
    adapter = Adapter(modules, meta, source)
    _check_rank_metadata(path, adapter)
    return adapter


def _check_rank_metadata(path, adapter: Adapter) -> None:
    decoded = parse_json_metadata(path, adapter.metadata)
    ranks = decoded.get("lora2_ranks")
    if ranks is None:
        return
    if not isinstance(ranks, dict):
        raise AdapterFormatError(f"{path}: metadata key 'lora2_ranks' is not a JSON object")
    actual = adapter.ranks()
    for name, r in ranks.items():
        if name in actual and actual[name] != r:
            raise AdapterFormatError(f"{path}: metadata 'lora2_ranks' gives {name!r} rank {r}, "
                                     f"but its tensors have rank {actual[name]}")
