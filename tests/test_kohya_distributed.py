"""Multi-process sd-scripts training without GPUs: two CPU processes over gloo.

The launcher runs the trainer extension under ``torch.distributed.run`` (the elastic launcher
``accelerate launch --multi_gpu`` uses) against tests/fake_sd_scripts, which drives the LoRA² network
in sd-scripts' arrangement: ``accelerator.prepare(network, optimizer, …)`` (the network wrapped in
DistributedDataParallel), gradients averaged with ``accelerator.reduce(…, "mean")``, different data on
each process.  Every process reports its network at the end (FAKE_SD_REPORT_DIR).
"""
import json
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from lora2_train.config import LoRA2Config
from lora2_train.format import load_adapter
from lora2_train.kohya import launch

FAKE = Path(__file__).resolve().parent / "fake_sd_scripts"
#: ν moves fast and nothing pulls it back: some components grow, others shrink (seen: 35 up, 53 down at step 2)
DEADLINE_S = 120
CONFIG = dict(r_init=8, r_target=8, r_max=16, lambda_r=0.0, nu_lr=3.0, resize_every=2, rank_block=1, lr=0.05)


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "check_requirements", lambda python, folder: None)  # the probe is tested apart
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ckpt = tmp_path / "sdxl.safetensors"
    ckpt.write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"\x89PNG")
    return ckpt, data


def train(tmp_path, monkeypatch, inputs, name, steps=8, report="report", seed=3, **kw):
    folder = tmp_path / report
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("FAKE_SD_REPORT_DIR", str(folder))
    events = []
    kw.setdefault("callback", events.append)
    kw.setdefault("num_processes", 2)
    # no hang: past the deadline the run is stopped (SIGTERM; the elastic agent kills what is left 30 s later)
    # and the test fails with TrainingCancelled
    deadline = time.monotonic() + DEADLINE_S
    kw.setdefault("should_stop", lambda: time.monotonic() > deadline)
    path = launch.train_sd_scripts(FAKE, inputs[0], inputs[1], tmp_path / "out", name, LoRA2Config(**CONFIG),
                                   steps, 64, 1, seed, python=sys.executable, cpu=True,
                                   poll_seconds=0.05, **kw)
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    return path, events, reports


def test_two_processes_reallocate_identically_stop_together_and_resume(tmp_path, monkeypatch, inputs):
    """Two processes with their own data, stopped after a few steps (Cancel) and resumed from the state
    the main process saved: the same ranks, ν and weights on both at the end after components grew and
    shrank, one progress line per step, every file written once."""
    monkeypatch.setenv("FAKE_SD_STEP_SLEEP", "0.3")
    first = []
    with pytest.raises(launch.TrainingCancelled) as info:
        train(tmp_path, monkeypatch, inputs, "ddp", report="cut", save_state=True,
              should_stop=lambda: len(first) >= 3, callback=first.append)
    stopped = first[-1].step
    assert [e.step for e in first] == list(range(1, stopped + 1)) and stopped < 8
    state = info.value.state
    assert state is not None and state.name == f"ddp-step{stopped:08d}-state"

    monkeypatch.setenv("FAKE_SD_STEP_SLEEP", "0")
    path, events, reports = train(tmp_path, monkeypatch, inputs, "ddp", report="end", resume_from=state,
                                  save_state=True)
    # progress comes from the main process only: one event per step, continuing at the saved step
    assert [e.step for e in events] == list(range(stopped + 1, 9))
    resized = [v for e in first + events for v in e.resized.values()]
    assert any(new > old for old, new in resized) and any(new < old for old, new in resized)
    assert len(reports) == 2
    r0, r1 = reports
    assert r0["processes"] == 2 and r0["prepared_as"] == "DistributedDataParallel"
    assert r0["steps"] == r1["steps"] == 8
    assert r0["ranks"] == r1["ranks"] and len(set(r0["ranks"].values())) > 1
    assert r0["nus"] == r1["nus"]
    assert r0["weights"] == r1["weights"] and r0["weight_norms"] == r1["weight_norms"]
    assert r0["first_loss"] != r1["first_loss"]  # each process trained on its own data
    # the files, each written once by the main process: the adapter at the stop, the final one
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == sorted(["ddp.safetensors", f"ddp-step{stopped:08d}.safetensors"]) and path.name == "ddp.safetensors"
    assert load_adapter(path).ranks() == r0["ranks"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*-state")) == sorted(["ddp-state", state.name])


def test_divergence_is_one_error_line_of_the_trainer(tmp_path, monkeypatch, capsys):
    """The trainer extension turns the re-allocation check's error into its one error line (the launcher
    reports that line; tests/test_distributed.py makes two real processes diverge)."""
    from lora2_train import distributed as D
    from lora2_train.kohya import network as kn
    from lora2_train.kohya import train as kt

    def diverged(net, step, ranks):
        raise D.ProcessesDiverged(f"LoRA² re-allocation at step {step}: the 2 processes disagree: x")

    monkeypatch.setattr(kn, "check_in_sync", diverged)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "out").mkdir()
    settings = launch.training_settings(tmp_path / "c.safetensors", tmp_path / "d.toml", tmp_path / "out", "one",
                                        LoRA2Config(**CONFIG), 3, 3)
    (tmp_path / "t.toml").write_text(launch.to_toml(settings))
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert kt.main(["--sd_scripts", str(FAKE), "--config_file", str(tmp_path / "t.toml")]) == 2
    finally:
        signal.signal(signal.SIGTERM, before)
        for name in ("train_network", "sdxl_train_network", "library", "library.train_util"):
            sys.modules.pop(name, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lora2_train.kohya.train: error: LoRA² re-allocation at step 2: the 2 processes disagree: x"
    assert not (tmp_path / "out" / "one.safetensors").exists()


def test_cancel_saves_state_and_resume_continues_the_run(tmp_path, monkeypatch, inputs):
    """One process: a run stopped after a few steps saves sd-scripts' state; resuming it ends with the
    network (ranks, ν, weights) of an uninterrupted run, which needs the ragged ranks restored before
    the optimizer state, the step count, and the step sd-scripts skips to."""
    _, _, (ref,) = train(tmp_path, monkeypatch, inputs, "ref", report="ref", num_processes=1, save_state=True)
    assert (tmp_path / "out" / "ref-state" / "optimizer.bin").is_file()

    monkeypatch.setenv("FAKE_SD_STEP_SLEEP", "0.3")
    seen = []
    with pytest.raises(launch.TrainingCancelled) as info:
        train(tmp_path, monkeypatch, inputs, "cut", report="cut", num_processes=1, save_state=True,
              should_stop=lambda: len(seen) >= 3, callback=seen.append)
    stopped = seen[-1].step
    assert 3 <= stopped < 8
    state = info.value.state
    assert state == (tmp_path / "out" / f"cut-step{stopped:08d}-state").resolve() and state.is_dir()
    assert info.value.path.name == f"cut-step{stopped:08d}.safetensors"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == stopped
    assert "resumable state" in str(info.value)

    monkeypatch.setenv("FAKE_SD_STEP_SLEEP", "0")
    path, events, (resumed,) = train(tmp_path, monkeypatch, inputs, "cut", report="resumed", num_processes=1,
                                     resume_from=state)
    assert [e.step for e in events] == list(range(stopped + 1, 9))
    assert resumed["steps"] == 8
    assert resumed["ranks"] == ref["ranks"] and len(set(ref["ranks"].values())) > 1
    assert resumed["nus"] == ref["nus"] and resumed["weights"] == ref["weights"]  # bit for bit
    assert path.name == "cut.safetensors" and load_adapter(path).ranks() == ref["ranks"]


def test_two_processes_without_seed_grow_the_same_rows(tmp_path, monkeypatch, inputs):
    """No --seed: sd-scripts (and the stand-in) seed each process with its own random draw; the network takes
    process 0's seed for the rows of A, so after components grew and shrank both hold the same network, and the
    file records that seed."""
    path, events, (r0, r1) = train(tmp_path, monkeypatch, inputs, "noseed", seed=None)
    assert r0["seed"] != r1["seed"]  # each process seeded on its own
    assert r0["network_seed"] == r1["network_seed"] == r0["seed"] % 2 ** 31
    resized = [v for e in events for v in e.resized.values()]
    assert any(new > old for old, new in resized) and any(new < old for old, new in resized)
    assert r0["ranks"] == r1["ranks"] and r0["nus"] == r1["nus"]
    assert r0["weights"] == r1["weights"] and r0["weight_norms"] == r1["weight_norms"]
    assert json.loads(load_adapter(path).metadata["lora2_config"])["seed"] == r0["network_seed"]


def test_a_run_without_seed_resumes_with_its_seed(tmp_path, monkeypatch, inputs):
    """No --seed, stopped and resumed: the processes of the resumed run draw new seeds of their own, but the
    network's row seed comes back from the saved state, the one the stopped run recorded in its file."""
    monkeypatch.setenv("FAKE_SD_STEP_SLEEP", "0.3")
    first = []
    with pytest.raises(launch.TrainingCancelled) as info:
        train(tmp_path, monkeypatch, inputs, "cut", report="cut", seed=None, save_state=True,
              should_stop=lambda: len(first) >= 3, callback=first.append)
    seed = json.loads(load_adapter(info.value.path).metadata["lora2_config"])["seed"]
    monkeypatch.setenv("FAKE_SD_STEP_SLEEP", "0")
    path, events, (r0, r1) = train(tmp_path, monkeypatch, inputs, "cut", report="end", seed=None,
                                   resume_from=info.value.state)
    assert r0["seed"] % 2 ** 31 != seed and r1["seed"] % 2 ** 31 != seed  # the resumed processes' own draws
    assert r0["network_seed"] == r1["network_seed"] == seed
    assert any(new > old for e in events for old, new in e.resized.values())  # rows grown after the resume
    assert r0["ranks"] == r1["ranks"] and r0["weights"] == r1["weights"]
    assert json.loads(load_adapter(path).metadata["lora2_config"])["seed"] == seed
