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


EVAL_FOLDER = "lora2_eval"  # ComfyUI/models/lora2_eval: DINO and CLIP model folders (save_pretrained)


def register_eval_folder() -> None:
    """Register ``models/lora2_eval`` with ComfyUI's folder_paths (no-op outside ComfyUI, never twice).

    extra_model_paths.yaml may add more folders under the same key ``lora2_eval``.
    """
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI
        return
    path = os.path.join(folder_paths.models_dir, EVAL_FOLDER)
    known = folder_paths.folder_names_and_paths.get(EVAL_FOLDER)
    if known is None or path not in known[0]:
        folder_paths.add_model_folder_path(EVAL_FOLDER, path)


def eval_roots() -> list[str]:
    try:
        import folder_paths
    except ImportError:
        return []
    return list(folder_paths.get_folder_paths(EVAL_FOLDER)) if EVAL_FOLDER in folder_paths.folder_names_and_paths \
        else []


def eval_model_names() -> list[str]:
    """Model folders (holding a config.json) under every ``lora2_eval`` folder, by name relative to it."""
    from lora2_train.evaluate import find_model_folders

    names: list[str] = []
    for root in eval_roots():
        names += [n for n in find_model_folders(root) if n not in names]
    return names


def eval_model_path(name: str) -> str:
    for root in eval_roots():
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError(f"model folder {name!r} not found in ComfyUI's models/{EVAL_FOLDER} folders "
                            f"(put a folder saved with save_pretrained there)")


def input_path(path: str) -> str:
    """`path` itself when absolute; otherwise relative to ComfyUI's input folder."""
    path = os.path.expanduser(path.strip())
    if os.path.isabs(path):
        return path
    try:
        import folder_paths
    except ImportError:
        return os.path.abspath(path)
    return os.path.join(folder_paths.get_input_directory(), path)
