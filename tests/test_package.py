import ast
import pathlib
import subprocess
import sys

import pytest

from tests_helpers import pack_module

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def pack():
    """The repository loaded as a package, the way ComfyUI loads a custom node folder."""
    with pack_module("lora2_pack") as mod:
        yield mod


def test_pack_imports_outside_comfyui_as_a_package(pack):
    assert pack.WEB_DIRECTORY == "./web"
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        inputs = cls.INPUT_TYPES()
        assert "required" in inputs
        assert isinstance(cls.RETURN_TYPES, tuple) and hasattr(cls, cls.FUNCTION)
        assert cls.CATEGORY.split("/")[0] == "LoRA²"  # settings and legacy nodes in LoRA²/training, LoRA²/legacy


def test_library_never_imports_comfyui():
    banned = {"comfy", "folder_paths", "server", "nodes", "comfy_extras", "execution"}
    for path in (ROOT / "lora2_train").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for n in names:
                assert n.split(".")[0] not in banned, f"{path} imports {n}"


def test_cli_help_and_one_line_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lora2_train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout
    (tmp_path / "summary.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "lora2_train", "demo", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert "summary.json" in r.stderr and "--overwrite" in r.stderr
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_visualize_node_returns_a_comfy_image(tmp_path, monkeypatch, pack):
    import torch

    from lora2_train.format import Adapter, LoRAModule, save_adapter

    ad = Adapter({f"lora_unet_input_blocks_4_1_transformer_blocks_0_attn{a}_to_{p}":
                  LoRAModule(torch.zeros(r, 8), torch.zeros(8, r), float(r))
                  for a, r in ((1, 4), (2, 12)) for p in ("q", "k")})
    save_adapter(ad, tmp_path / "a.safetensors")
    monkeypatch.setattr(sys.modules["lora2_pack.nodes._pack"], "lora_path", lambda name: str(tmp_path / name))
    node = pack.NODE_CLASS_MAPPINGS["LoRA2VisualizeRanks"]()
    (image,) = node.visualize("a.safetensors", compare_with="a.safetensors")
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_node_layer_stays_thin():
    """nodes/ is ComfyUI wiring: no function or method there over 60 lines (the work lives in lora2_train and in
    small glue modules of nodes/train/)."""
    import ast

    long = []
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = fn.end_lineno - fn.lineno + 1
                if n > 60:
                    long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({n} lines)")
    assert long == []
