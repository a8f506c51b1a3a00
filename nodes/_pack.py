"""Makes the bundled ``lora2_train`` library importable when ComfyUI loads this folder as a package."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def lora_path(name: str) -> str:
    """Full path of an entry of ComfyUI's ``loras`` list; a clear error names a missing file."""
    import folder_paths  # ComfyUI module, available only inside ComfyUI

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise FileNotFoundError(f"LoRA file {name!r} not found in ComfyUI's loras folders")
    return path


def lora_names() -> list[str]:
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI
        return []
    return folder_paths.get_filename_list("loras")
