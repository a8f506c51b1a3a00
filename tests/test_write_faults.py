"""Writes under faults: a full disk, an I/O error, a process killed (SIGKILL, or SIGXFSZ from a file-size limit) at
any point of a write, and two writers of one name at once.  Each leaves the old file or the complete new one, never
a truncated one; the next write removes the temporary files a killed writer left behind; of two writers of one
new name one wins and the other gets FileExistsError (or, through the nodes, a new name)."""
import errno
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import lora2_train.format as fmt
from lora2_train.format import Adapter, LoRAModule, atomic_write_bytes, load_adapter, read_safetensors, save_adapter

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"


def adapter(seed=0, rank=8):
    g = torch.Generator().manual_seed(seed)
    return Adapter({n: LoRAModule(torch.randn(rank, 64, generator=g), torch.randn(64, rank, generator=g), float(rank))
                    for n in (Q, K)})


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------ full disk, I/O errors

def _enospc_after(monkeypatch, n):
    real, written = os.write, [0]

    def write(fd, data):
        if written[0] + len(data) > n:
            written[0] += real(fd, bytes(data[: max(0, n - written[0])]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += real(fd, data)
        return len(data)
    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("replacing", [True, False])
def test_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, replacing):
    path = tmp_path / "checkpoint.pt"
    if replacing:
        path.write_bytes(b"old contents")
    _enospc_after(monkeypatch, 1000)
    with pytest.raises(OSError, match=r"checkpoint.pt: writing failed \(No space left on device\)") as e:
        atomic_write_bytes(path, os.urandom(100_000), overwrite=True)
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert (path.read_bytes() == b"old contents") if replacing else not path.exists()
    assert leftovers(tmp_path) == []


def test_full_disk_in_the_safetensors_writer_through_the_cli(tmp_path, monkeypatch, capsys):
    from lora2_train import cli
    src = save_adapter(adapter(), tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"
    save_adapter(adapter(seed=1), out)
    before = out.read_bytes()
    real = fmt.save_file

    def full_disk(sd, name, metadata=None):  # the library writes part of the file, then the disk is full
        real(sd, name, metadata=metadata)
        with open(name, "r+b") as f:
            f.truncate(os.path.getsize(name) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fmt, "save_file", full_disk)
    capsys.readouterr()
    assert cli.main(["pad", str(src), "-o", str(out), "--overwrite", "--rank", "16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err and "No space left on device" in err, err
    assert out.read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["fsync", "replace", "chmod"])
def test_io_error_at_each_step_leaves_the_old_file(tmp_path, monkeypatch, where):
    path = tmp_path / "a.safetensors"
    save_adapter(adapter(), path)
    before = path.read_bytes()

    def fail(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, where, fail)
    with pytest.raises(OSError, match="Input/output error"):
        save_adapter(adapter(seed=1), path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    assert load_adapter(path).modules[Q].rank == 8


def test_file_size_limit_in_a_subprocess_refuses_cleanly(tmp_path):
    """RLIMIT_FSIZE with SIGXFSZ ignored: the safetensors writer gets EFBIG halfway; the old file stays."""
    path = tmp_path / "a.safetensors"
    save_adapter(adapter(), path)
    before = path.read_bytes()
    code = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, resource.RLIM_INFINITY)); "
            f"from lora2_train import cli; sys.exit(cli.main(['pad', {str(path)!r}, '-o', {str(path)!r}, "
            f"'--overwrite', '--rank', '16']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "File too large" in r.stderr and str(path) in r.stderr, r.stderr
    assert path.read_bytes() == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ killed mid-write

def _killed(action, hook):
    """Run `action` in a forked child that `hook` arranges to kill; returns the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # child: no pytest, no cleanup handlers; only the write under test
        code = 0
        try:
            signal.alarm(60)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            hook()
            action()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


def _suicide():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_bytes(n):
    def hook():
        real, written = os.write, [0]

        def write(fd, data):
            if written[0] + len(data) > n:
                real(fd, bytes(data[: n - written[0]]))
                _suicide()
            written[0] += real(fd, data)
            return len(data)
        os.write = write
    return hook


def _kill_at(name, after=False):
    def hook():
        real = getattr(os, name)

        def call(*a, **k):
            if not after:
                _suicide()
            real(*a, **k)
            _suicide()
        setattr(os, name, call)
    return hook


NEW = os.urandom(300_000)
KILL_POINTS = {"before any byte": _kill_after_bytes(0), "after 1 byte": _kill_after_bytes(1),
               "after 64 KiB": _kill_after_bytes(65536), "1 byte short": _kill_after_bytes(len(NEW) - 1),
               "before fsync": _kill_at("fsync"), "before rename": _kill_at("replace"),
               "after rename": _kill_at("replace", after=True)}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_during_a_replacing_write_leaves_old_or_new(tmp_path, point):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    sig = _killed(lambda: atomic_write_bytes(path, NEW, overwrite=True), KILL_POINTS[point])
    assert sig == signal.SIGKILL
    assert path.read_bytes() == (NEW if point == "after rename" else b"old")
    atomic_write_bytes(path, b"next", overwrite=True)  # the next write removes what the killed one left
    assert path.read_bytes() == b"next" and leftovers(tmp_path) == []


@pytest.mark.parametrize("point", ["before link", "after link", "after 1 byte"])
def test_sigkill_during_a_new_file_write_leaves_nothing_or_all(tmp_path, point):
    path = tmp_path / "data.bin"
    hook = {"before link": _kill_at("link"), "after link": _kill_at("link", after=True),
            "after 1 byte": _kill_after_bytes(1)}[point]
    assert _killed(lambda: atomic_write_bytes(path, NEW), hook) == signal.SIGKILL
    assert path.read_bytes() == NEW if point == "after link" else not path.exists()
    atomic_write_bytes(path, b"next", overwrite=True)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
def test_killed_by_the_file_size_limit_inside_the_safetensors_writer(tmp_path, fraction):
    """With SIGXFSZ's default action the kernel kills the process the moment the writer passes the limit."""
    path = tmp_path / "a.safetensors"
    save_adapter(adapter(), path)
    before = path.read_bytes()
    limit = int(len(before) * fraction)

    def hook():
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # (Python ignores it by default: writes would fail instead)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    assert _killed(lambda: save_adapter(adapter(seed=1), path, overwrite=True), hook) == signal.SIGXFSZ
    assert path.read_bytes() == before
    save_adapter(adapter(seed=2), path, overwrite=True)
    assert leftovers(tmp_path) == [] and torch.equal(load_adapter(path).modules[Q].down,
                                                     adapter(seed=2).modules[Q].down.half())


def test_checkpoint_killed_mid_write_still_resumes(tmp_path):
    from test_trainer import setup

    from lora2_train.trainer import Trainer
    t = Trainer(*setup(steps=6), out_dir=tmp_path)
    t.step = 2  # (a checkpoint as training writes it; the training steps themselves do not matter here)
    ckpt = t.save_checkpoint()
    size = ckpt.stat().st_size
    t.step = 5
    fresh = Trainer(*setup(steps=6))
    for n in (0, size // 3, size - 1):
        assert _killed(t.save_checkpoint, _kill_after_bytes(n)) == signal.SIGKILL
        fresh.load_checkpoint(ckpt)
        assert fresh.step == 2
    t.save_checkpoint()  # the next checkpoint write cleans up after the killed ones
    assert leftovers(tmp_path) == []
    fresh.load_checkpoint(ckpt)
    assert fresh.step == 5


def test_clean_up_leaves_a_live_writer_alone(tmp_path):
    """A write in progress holds a lock on its temporary file: another writer's clean-up must not take it."""
    path = tmp_path / "a.bin"
    started, release, result = threading.Event(), threading.Event(), {}

    def slow(tmp, fd):
        os.write(fd, b"first")
        started.set()
        release.wait(30)

    def first():
        try:
            result["path"] = fmt._atomic(path, slow, overwrite=True)
        except Exception as e:  # pragma: no cover - reported below
            result["error"] = e
    th = threading.Thread(target=first)
    th.start()
    assert started.wait(30)
    assert len(leftovers(tmp_path)) == 1
    atomic_write_bytes(path, b"second", overwrite=True)
    assert len(leftovers(tmp_path)) == 1  # the first writer's file is still there
    release.set()
    th.join(30)
    assert "error" not in result and path.read_bytes() == b"first" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ two writers, one name

def _slow_writes(monkeypatch, delay=0.05):
    real = os.write

    def write(fd, data):
        time.sleep(delay)
        return real(fd, data)
    monkeypatch.setattr(os, "write", write)


def test_two_writers_of_one_new_name_one_wins(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    _slow_writes(monkeypatch)
    barrier, outcome = threading.Barrier(4), {}

    def writer(i):
        barrier.wait()
        try:
            atomic_write_bytes(path, f"writer {i}".encode())
            outcome[i] = "won"
        except FileExistsError as e:
            outcome[i] = str(e)
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    winners = [i for i, o in outcome.items() if o == "won"]
    assert len(winners) == 1, outcome
    assert path.read_bytes() == f"writer {winners[0]}".encode()
    assert all("x.bin: already exists" in o for i, o in outcome.items() if i != winners[0])
    assert leftovers(tmp_path) == []


def test_two_node_saves_of_one_name_get_two_names(tmp_path, monkeypatch):
    from tests_helpers import pack_module
    with pack_module("lora2_faults_pack"):
        save_new = sys.modules["lora2_faults_pack.nodes.tools"].save_new
        real = fmt.save_file

        def slow_save(*a, **k):
            time.sleep(0.1)
            return real(*a, **k)
        monkeypatch.setattr(fmt, "save_file", slow_save)
        barrier, names = threading.Barrier(3), {}

        def node(i):
            barrier.wait()
            names[i] = save_new(adapter(seed=i), str(tmp_path), "merged", "fp16")
        threads = [threading.Thread(target=node, args=(i,)) for i in range(3)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    assert sorted(names.values()) == ["merged.safetensors", "merged_2.safetensors", "merged_3.safetensors"]
    for i, name in names.items():  # each file holds its own writer's adapter, whole
        tensors, _ = read_safetensors(tmp_path / name)
        assert torch.equal(tensors[f"{Q}.lora_down.weight"], adapter(seed=i).modules[Q].down.half())
    assert leftovers(tmp_path) == []


def test_two_cli_runs_writing_one_output(tmp_path):
    src = save_adapter(adapter(), tmp_path / "a.safetensors")
    out = tmp_path / "out.safetensors"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "lora2_train", "pad", str(src), "-o", str(out), "--rank", "16"]
    procs = [subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1).strip()
    assert err.count("\n") == 0 and "already exists" in err, err
    assert load_adapter(out).modules[Q].rank == 16 and leftovers(tmp_path) == []
