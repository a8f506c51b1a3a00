"""Run LoRA² training under sd-scripts in a subprocess: ``train_sd_scripts(...)`` and ``python -m lora2_train train``.

The launcher checks the sd-scripts checkout and its Python, writes two toml
files (the dataset config and the training options) into
``<output_dir>/.lora2-<name>/``, runs the trainer extension
(``python -m lora2_train.kohya.train``) under the given Python and turns its
``LORA2_PROGRESS`` lines into :class:`lora2_train.trainer.ProgressEvent`
objects.  The complete output goes to ``<output_dir>/.lora2-<name>/train.log``.

``num_processes`` > 1 runs the trainer extension under ``accelerate launch
--multi_gpu --num_processes N`` (one process per CUDA device, gradients averaged
by sd-scripts through accelerate), or, with ``cpu=True``, under
``torch.distributed.run`` with N CPU processes over gloo (for tests).
Sample images (sd-scripts' ``--sample_prompts``) land in
``<output_dir>/sample/``; :func:`sample_images` lists those of a run.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..config import LoRA2Config
from ..format import output_path
from ..optim import OPTIMIZERS, SD_SCRIPTS_NAMES
from ..progress import progress_bar
from ..sample_prompts import prompt_lines
from ..trainer import ProgressEvent

PROGRESS_PREFIX = "LORA2_PROGRESS "
SAVED_PREFIX = "LORA2_SAVED "
STATE_PREFIX = "LORA2_STATE "
ERROR_PREFIX = "lora2_train.kohya.train: error: "
#: files whose presence marks an sd-scripts checkout, and hooks LoRA² needs in them
CHECKOUT_FILES = ("train_network.py", "sdxl_train_network.py", "library/train_util.py")
REQUIRED_TEXT = {
    "train_network.py": ("def process_batch(", "def assert_extra_args(", "create_network_from_weights"),
    "sdxl_train_network.py": ("class SdxlNetworkTrainer",),
}
#: modules sd-scripts imports at start (import name → requirement)
REQUIRED_MODULES = {"torch": "torch", "accelerate": "accelerate", "diffusers": "diffusers",
                    "transformers": "transformers", "safetensors": "safetensors", "toml": "toml",
                    "voluptuous": "voluptuous", "einops": "einops", "imagesize": "imagesize", "cv2": "opencv-python"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPO_ROOT = Path(__file__).resolve().parents[2]


class SdScriptsError(RuntimeError):
    """sd-scripts is missing, unsupported or failed; the message is one line naming the folder or cause."""


class TrainingCancelled(RuntimeError):
    """``should_stop()`` ended the run; ``path`` is the last adapter saved (None if none was)."""

    def __init__(self, message: str, path: Path | None = None, state: Path | None = None):
        super().__init__(message)
        self.path = path
        #: sd-scripts' training state saved on the stop (``resume_from`` continues from it), or None
        self.state = state


# ---- checks ------------------------------------------------------------------------------------
def check_sd_scripts(folder) -> Path:
    """The folder as a Path if it is an sd-scripts checkout with the hooks LoRA² uses; else SdScriptsError."""
    if not folder:
        raise SdScriptsError("no sd-scripts folder given")
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise SdScriptsError(f"{path}: no such folder (expected an sd-scripts checkout)")
    for name in CHECKOUT_FILES:
        if not (path / name).is_file():
            raise SdScriptsError(f"{path}: not an sd-scripts checkout ({name} is missing)")
    for name, needles in REQUIRED_TEXT.items():
        text = (path / name).read_text(encoding="utf-8", errors="replace")
        for needle in needles:
            if needle not in text:
                hook = needle.replace("def ", "").replace("class ", "").rstrip("(")
                raise SdScriptsError(f"{path / name}: this sd-scripts version lacks {hook!r}, which LoRA² hooks "
                                     f"into; update the checkout")
    return path


def cuda_device_count(python: str, folder: Path) -> int:
    """CUDA devices `python` (sd-scripts' interpreter) sees."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([python, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise SdScriptsError(f"{python}: no such Python interpreter") from None
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SdScriptsError(f"{python}: cannot count CUDA devices ({(out.stderr or out.stdout).strip()[-200:]})") from None


def launch_command(python: str, folder: Path, config_file: Path, num_processes: int = 1, cpu: bool = False,
                   mixed_precision: str = "no") -> list[str]:
    """The command that runs the trainer extension: directly for one process; for N processes under
    ``accelerate launch --multi_gpu`` (one per CUDA device, a free port), or on the CPU under
    ``torch.distributed.run`` (gloo; accelerate reads its environment: ``ACCELERATE_USE_CPU``)."""
    script = ["-m", "lora2_train.kohya.train", "--sd_scripts", str(folder), "--config_file", str(config_file)]
    if num_processes == 1:
        return [python] + script
    if cpu:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)] + script
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", "0"] + script


def check_requirements(python: str, folder: Path) -> None:
    """Ask `python` whether sd-scripts' requirements import; one-line SdScriptsError naming what is missing."""
    code = ("import importlib.util, json; print(json.dumps([m for m in %r if importlib.util.find_spec(m) is None]))"
            % list(REQUIRED_MODULES))
    try:
        out = subprocess.run([python, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SdScriptsError(f"{python}: no such Python interpreter") from None
    if out.returncode != 0:
        raise SdScriptsError(f"{python}: cannot run ({(out.stderr or out.stdout).strip().splitlines()[-1:]})")
    missing = json.loads(out.stdout.strip().splitlines()[-1])
    if missing:
        reqs = ", ".join(REQUIRED_MODULES[m] for m in missing)
        raise SdScriptsError(f"{python} lacks sd-scripts requirements ({reqs}): run "
                             f"{python} -m pip install -r {folder / 'requirements.txt'}")


# ---- config files --------------------------------------------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(settings: dict, tables: dict | None = None) -> str:
    """Flat ``key = value`` lines, then ``[table]`` / ``[[array.of.tables]]`` sections (a small TOML writer)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in settings.items() if v is not None]
    for header, body in (tables or {}).items():
        lines += ["", header] + [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
    return "\n".join(lines) + "\n"


def network_args(config: LoRA2Config) -> list[str]:
    """LoRA2Config → sd-scripts ``--network_args`` strings (see :mod:`lora2_train.kohya.network`)."""
    names = ("r_max", "r_target", "r_min", "q", "lambda_r", "lambda_e", "beta", "nu_lr", "resize_every",
             "rank_block", "scale", "entropy_queries")
    args = [f"{n}={getattr(config, n)}" for n in names] + [f"targets={','.join(config.targets)}"]
    if config.max_params:
        args.append(f"max_params={config.max_params}")
    return args


def optimizer_options(config: LoRA2Config) -> dict:
    """sd-scripts ``optimizer_type`` / ``optimizer_args`` for ``config.optimizer`` (lora2_train.optim).
    Adafactor runs at the given learning rate (no relative step, no parameter scaling), as in the
    embedded trainer."""
    args = [f"weight_decay={config.weight_decay}"]
    if config.optimizer == "adafactor":
        args += ["relative_step=False", "scale_parameter=False", "warmup_init=False"]
    return {"optimizer_type": SD_SCRIPTS_NAMES[config.optimizer], "optimizer_args": args}


#: sd-scripts settings per GPU memory size (SDXL, U-Net only, caches on disk).  Designed from the sizes
#: involved (U-Net 2.6 B parameters: 5.1 GB in bf16, 2.6 GB in fp8; LoRA parameters 16 B each with fp32
#: AdamW, 6 B with full bf16 + AdamW8bit; activations with gradient checkpointing about 1.5 GB per 768² and
#: 3 GB per 1024² image); not measured on a GPU.
VRAM_PRESETS = {
    "8GB": dict(resolution=768, batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit", fp8_base=True,
                full_bf16=True, max_params=20_000_000),
    "12GB": dict(resolution=1024, batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit", fp8_base=True,
                 full_bf16=True, max_params=50_000_000),
    "16GB": dict(resolution=1024, batch_size=1, gradient_checkpointing=True, optimizer="adamw8bit", fp8_base=False,
                 full_bf16=True, max_params=100_000_000),
    "24GB": dict(resolution=1024, batch_size=2, gradient_checkpointing=True, optimizer="adamw", fp8_base=False,
                 full_bf16=False, max_params=200_000_000),
    "48GB": dict(resolution=1024, batch_size=4, gradient_checkpointing=True, optimizer="adamw", fp8_base=False,
                 full_bf16=False, max_params=0),
}


def training_options(config: LoRA2Config) -> dict:
    """The training controls of `config` as sd-scripts options (the same names; ``mse`` is sd-scripts'
    ``l2``, and its Huber threshold is held constant as in the embedded trainer)."""
    opts = {"gradient_accumulation_steps": config.gradient_accumulation_steps,
            "max_grad_norm": config.max_grad_norm, "lr_scheduler": config.lr_scheduler,
            "lr_warmup_steps": config.lr_warmup_steps or None,
            "min_snr_gamma": config.min_snr_gamma or None, "noise_offset": config.noise_offset or None,
            "loss_type": {"mse": "l2", "huber": "huber"}[config.loss_type]}
    if config.loss_type == "huber":
        opts.update(huber_c=config.huber_c, huber_schedule="constant")
    return opts


def vram_preset(name: str) -> dict:
    """The settings of a VRAM preset (a copy); one-line ValueError naming the presets for another name."""
    if name not in VRAM_PRESETS:
        raise ValueError(f"preset {name!r} is not one of {', '.join(VRAM_PRESETS)}")
    return dict(VRAM_PRESETS[name], mixed_precision="bf16")


def cache_options(config: LoRA2Config) -> dict:
    """sd-scripts options that keep latents (and text-encoder outputs when the encoders are not trained) on disk."""
    te = any(t.startswith("te_") for t in config.targets)
    return {"cache_latents_to_disk": True, **({} if te else {"cache_text_encoder_outputs_to_disk": True})}


def check_precision(settings: dict) -> None:
    """sd-scripts' precision options that only work together, refused in one line before the run."""
    mp = settings.get("mixed_precision") or "no"
    if mp not in ("no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mp!r}")
    if settings.get("full_bf16") and mp != "bf16":
        raise ValueError(f"full_bf16 needs mixed_precision 'bf16', got {mp!r}")
    if settings.get("full_fp16") and mp != "fp16":
        raise ValueError(f"full_fp16 needs mixed_precision 'fp16', got {mp!r}")
    if (settings.get("fp8_base") or settings.get("fp8_base_unet")) and mp == "no":
        raise ValueError("fp8_base needs mixed_precision 'bf16' or 'fp16', got 'no'")


def dataset_toml(dataset_dir: Path, resolution: int, batch_size: int, class_tokens: str) -> str:
    """sd-scripts dataset config: one DreamBooth-style subset, captions from ``<image>.txt``."""
    return to_toml({}, {
        "[general]": {"caption_extension": ".txt", "shuffle_caption": False, "keep_tokens": 0},
        "[[datasets]]": {"resolution": [resolution, resolution], "batch_size": batch_size, "enable_bucket": True,
                         "min_bucket_reso": max(64, resolution // 2), "max_bucket_reso": resolution * 2,
                         "bucket_reso_steps": 64},
        "[[datasets.subsets]]": {"image_dir": str(dataset_dir), "num_repeats": 1, "class_tokens": class_tokens},
    })


SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")


def training_settings(base_checkpoint, dataset_config, output_dir, output_name, config: LoRA2Config, steps: int,
                      seed: int, tokenizer_cache_dir=None, save_every: int | None = None, extra: dict | None = None,
                      sample_prompts_file=None, sample_every: int | None = None, sample_sampler: str = "euler_a",
                      resume_from=None, save_state: bool = False):
    """sd-scripts options (argparse names) for one LoRA² run; ``extra`` adds or replaces any of them.

    Samples: ``sample_prompts_file`` (sd-scripts' prompt file) every ``sample_every`` steps with
    ``sample_sampler``.  ``save_state``: sd-scripts keeps its training state at the end
    (``<name>-state``), at every ``save_every`` and on a stop request (``<name>-step<N>-state``).
    ``resume_from``: such a state folder; the run continues at its step (``--skip_until_initial_step``
    skips the batches already seen)."""
    te = any(t.startswith("te_") for t in config.targets)
    s = {
        "pretrained_model_name_or_path": str(base_checkpoint),
        "dataset_config": str(dataset_config),
        "output_dir": str(output_dir),
        "output_name": output_name,
        "save_model_as": "safetensors",
        "save_precision": "fp16",
        "network_module": "lora2_train.kohya.network",
        "network_dim": config.r_init,
        "network_alpha": config.r_init,
        "network_args": network_args(config),
        "network_train_unet_only": not te,
        "cache_text_encoder_outputs": not te,
        "cache_latents": True,
        "max_train_steps": steps,
        "learning_rate": config.lr,
        "unet_lr": config.lr,
        # text-encoder LoRAs (targets te_attn / te_mlp): their own learning rate, 0 meaning the U-Net's
        "text_encoder_lr": (config.text_encoder_lr or config.lr) if te else None,
        **optimizer_options(config),
        "lr_scheduler": "constant",
        "mixed_precision": config.mixed_precision,
        "gradient_checkpointing": config.gradient_checkpointing,
        "seed": seed,
        "max_data_loader_n_workers": 0,
        "sdpa": True,
        "save_every_n_steps": save_every if save_every and save_every < steps else None,
        "tokenizer_cache_dir": str(tokenizer_cache_dir) if tokenizer_cache_dir else None,
    }
    if sample_prompts_file is not None and sample_every:
        s.update(sample_prompts=str(sample_prompts_file), sample_every_n_steps=int(sample_every),
                 sample_sampler=sample_sampler)
    if save_state:
        s["save_state_on_train_end"] = True
        if s["save_every_n_steps"]:
            s["save_state"] = True
    if resume_from is not None:
        s.update(resume=str(resume_from), skip_until_initial_step=True)
    s.update(extra or {})
    check_precision(s)
    return s


def check_state_dir(folder) -> Path:
    """A training state saved by sd-scripts (accelerate's ``save_state``), or a one-line error."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from: {path}: no such state folder (sd-scripts writes <name>-state or "
                                f"<name>-step<N>-state beside the adapter)")
    if not (path / "optimizer.bin").is_file() or not any(path.glob("model*.safetensors")) and \
            not any(path.glob("pytorch_model*.bin")):
        raise ValueError(f"resume_from: {path}: not an sd-scripts training state (no optimizer.bin / model.safetensors)")
    return path.resolve()


def sample_prompt_lines(prompts) -> list[str]:
    """Prompt lines of sd-scripts' prompt file: one prompt per line (its options such as ``--w 1024 --h 1024
    --s 28 --d 1`` may follow the prompt on the line); empty lines and ``#`` comments are dropped
    (:func:`lora2_train.sample_prompts.prompt_lines`)."""
    return prompt_lines(prompts)


def write_sample_prompts(path: Path, prompts) -> Path:
    path.write_text("\n".join(sample_prompt_lines(prompts)) + "\n", encoding="utf-8")
    return path


def sample_images(output_dir, output_name: str, since: float = 0.0) -> list[Path]:
    """The sample images sd-scripts wrote for ``output_name`` (``<output_dir>/sample/<name>_<step>_<i>_…png``)
    modified at or after `since`, in step then prompt order."""
    folder = Path(output_dir) / "sample"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob(f"{output_name}_*.png"):
        parts = p.stem[len(output_name) + 1:].split("_")
        if len(parts) < 3 or not parts[1].isdigit() or p.stat().st_mtime < since - 1:
            continue
        step = parts[0]
        key = (0, int(step)) if step.isdigit() else (1, int(step[1:]) if step[1:].isdigit() else 0)
        found.append((key, int(parts[1]), p.name, p))
    return [p for *_, p in sorted(found)]


# ---- progress ------------------------------------------------------------------------------------
def parse_progress_line(line: str, ranks: dict | None = None) -> ProgressEvent | None:
    """A ``LORA2_PROGRESS {json}`` line → ProgressEvent (None for other lines).  Lines carry ranks only
    when they may have changed; `ranks` (the last known) fills the others."""
    i = line.find(PROGRESS_PREFIX)
    if i < 0:
        return None
    try:
        d = json.loads(line[i + len(PROGRESS_PREFIX):])
        return ProgressEvent(
            step=int(d["step"]), total=int(d["total"]), loss=float(d["loss"]), mse=float(d["mse"]),
            reg=float(d["reg"]), entropy=float(d["entropy"]), ranks=dict(d.get("ranks") or ranks or {}),
            num_params=int(d["num_params"]), resized={k: tuple(v) for k, v in d.get("resized", {}).items()},
            elapsed=float(d["elapsed"]))
    except (ValueError, KeyError, TypeError):
        return None


def parse_saved_line(line: str, prefix: str = SAVED_PREFIX) -> dict | None:
    i = line.find(prefix)
    if i < 0:
        return None
    try:
        return json.loads(line[i + len(prefix):])
    except ValueError:
        return None


def _error_of(lines: list[str]) -> str:
    """The most telling line of a failed run's output."""
    for line in reversed(lines):
        if ERROR_PREFIX in line:
            return line.split(ERROR_PREFIX, 1)[1].strip()
    for line in reversed(lines):
        s = line.strip()
        if s and (s.split(":", 1)[0].endswith(("Error", "Exception")) or s.startswith("AssertionError")):
            return s
    tail = [s.strip() for s in lines if s.strip()]
    return tail[-1] if tail else "no output"


# ---- the run -------------------------------------------------------------------------------------
def train_sd_scripts(sd_scripts_dir, base_checkpoint, dataset_dir, output_dir, output_name, config: LoRA2Config,
                     steps, resolution, batch_size, seed, python=None,
                     callback: Callable[[ProgressEvent], None] | None = None,
                     should_stop: Callable[[], bool] | None = None, *, overwrite: bool = False,
                     tokenizer_cache_dir=None, save_every: int | None = None, extra_options: dict | None = None,
                     poll_seconds: float = 0.5, num_processes: int = 1, cpu: bool = False,
                     sample_prompts=None, sample_every: int | None = None, sample_sampler: str = "euler_a",
                     resume_from=None, save_state: bool = False) -> Path:
    """Train a LoRA² adapter with sd-scripts; returns the path of the saved adapter.

    `callback` gets a ProgressEvent per optimizer step; `should_stop()` → True terminates the run (the
    trainer saves its current adapter, and with `save_state` its training state, first) and raises
    :class:`TrainingCancelled` naming the last saved file and state.  `extra_options` adds or replaces
    sd-scripts options (argparse names, e.g. ``{"gradient_checkpointing": True}``).  `num_processes`:
    data-parallel processes (one per CUDA device; `cpu`: CPU processes over gloo).  `sample_prompts`
    (a list of lines or one string) every `sample_every` steps: see :func:`sample_images`.
    `resume_from`: an sd-scripts state folder of an earlier run of the same settings.  Nothing is
    overwritten unless `overwrite`.
    """
    folder = check_sd_scripts(sd_scripts_dir)
    python = str(python or sys.executable)
    config = config.validate()
    check_precision({"mixed_precision": config.mixed_precision, **(extra_options or {})})
    base_checkpoint, dataset_dir = Path(base_checkpoint).expanduser(), Path(dataset_dir).expanduser()
    if not base_checkpoint.is_file():
        raise FileNotFoundError(f"{base_checkpoint}: no such checkpoint file")
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"{dataset_dir}: no such dataset folder")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in dataset_dir.iterdir()):
        raise ValueError(f"{dataset_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in the dataset folder")
    if tokenizer_cache_dir is not None and not Path(tokenizer_cache_dir).is_dir():
        raise FileNotFoundError(f"{tokenizer_cache_dir}: no such tokenizer folder")
    for name, v in (("steps", steps), ("resolution", resolution), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if resolution % 64:
        raise ValueError(f"resolution must be a multiple of 64, got {resolution}")
    if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if sample_sampler not in SAMPLERS:
        raise ValueError(f"sample_sampler must be one of {', '.join(SAMPLERS)}, got {sample_sampler!r}")
    if sample_every is not None and (not isinstance(sample_every, int) or sample_every < 0):
        raise ValueError(f"sample_every must be a non-negative integer, got {sample_every!r}")
    if resume_from:
        resume_from = check_state_dir(resume_from)
    if sample_every:
        sample_prompt_lines(sample_prompts)
    target = output_path(output_dir, output_name)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite to replace it)")
    check_requirements(python, folder)
    if num_processes > 1 and not cpu:
        devices = cuda_device_count(python, folder)
        if devices < num_processes:
            raise SdScriptsError(f"num_processes={num_processes} needs {num_processes} CUDA devices; {python} sees "
                                 f"{devices}")

    out_dir = target.parent
    work = out_dir / f".lora2-{target.stem}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "dataset.toml").write_text(dataset_toml(dataset_dir.resolve(), resolution, batch_size, target.stem))
    prompts_file = None
    if sample_prompts and sample_every:
        prompts_file = write_sample_prompts(work / "sample_prompts.txt", sample_prompts)
    settings = training_settings(base_checkpoint.resolve(), work / "dataset.toml", out_dir.resolve(), target.stem,
                                 config, steps, seed, tokenizer_cache_dir and Path(tokenizer_cache_dir).resolve(),
                                 save_every, extra_options, prompts_file, sample_every, sample_sampler,
                                 resume_from, save_state)
    (work / "train.toml").write_text(to_toml(settings))
    cmd = launch_command(python, folder, work / "train.toml", num_processes, cpu, config.mixed_precision)
    return _run(cmd, folder, work / "train.log", target, callback, should_stop, poll_seconds,
                group=num_processes > 1, cpu=cpu)


def _kill(proc, group: bool) -> None:
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker it started
            return
        except (ProcessLookupError, PermissionError):
            pass
    proc.kill()


def _run(cmd, cwd, log_path: Path, target: Path, callback, should_stop, poll_seconds, group: bool = False,
         cpu: bool = False) -> Path:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    # several processes: a session of their own, so that an error here ends the workers too
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", bufsize=1, start_new_session=group)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: list[str] = []
    ranks: dict = {}
    last_saved: Path | None = None
    last_state: Path | None = None
    stopping = False
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            while True:
                if not stopping and should_stop is not None and should_stop():
                    stopping = True
                    proc.send_signal(signal.SIGTERM)
                try:
                    line = lines.get(timeout=poll_seconds)
                except queue.Empty:
                    continue
                if line is None:
                    break
                log.write(line)
                tail = (tail + [line])[-200:]
                event = parse_progress_line(line, ranks)
                if event is not None:
                    ranks = event.ranks
                    if callback is not None:
                        callback(event)
                    continue
                saved = parse_saved_line(line)
                if saved is not None:
                    last_saved = Path(saved["path"])
                state = parse_saved_line(line, STATE_PREFIX)
                if state is not None:
                    last_state = Path(state["path"])
        except BaseException:
            _kill(proc, group)
            raise
        finally:
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                _kill(proc, group)
                rc = proc.wait()
    if stopping:
        where = f"; last saved: {last_saved}" if last_saved else "; nothing was saved"
        if last_state is not None:
            where += f"; resumable state: {last_state}"
        raise TrainingCancelled(f"training stopped{where}", last_saved, last_state)
    if rc != 0:
        why = _error_of(tail) if rc != -9 else ("killed (SIGKILL; on Linux most often the out-of-memory killer: "
                                                 "free memory, or lower resolution/batch or use a --preset)")
        raise SdScriptsError(f"sd-scripts training failed (exit {rc}): {why} (log: {log_path})")
    if target.exists():
        return target
    if last_saved is not None and last_saved.exists():
        return last_saved
    raise SdScriptsError(f"sd-scripts finished but wrote no adapter at {target} (log: {log_path})")


# ---- command line ----------------------------------------------------------------------------------
def add_train_parser(sub) -> None:
    """``python -m lora2_train train …`` (registered by lora2_train.cli.build_parser)."""
    t = sub.add_parser("train", help="train a LoRA² adapter on an SDXL checkpoint with sd-scripts")
    t.add_argument("--backend", choices=("sd-scripts", "embedded"), default="sd-scripts")
    t.add_argument("--sd-scripts", dest="sd_scripts", default=os.environ.get("SD_SCRIPTS_DIR"),
                   help="sd-scripts checkout (default: $SD_SCRIPTS_DIR)")
    t.add_argument("--sd-scripts-python", dest="sd_python", default=None,
                   help="Python with sd-scripts' requirements (default: this Python)")
    t.add_argument("--checkpoint", required=True, help="SDXL checkpoint (.safetensors)")
    t.add_argument("--dataset", required=True, help="folder of images with <image>.txt captions")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--name", required=True, help="adapter name (<out>/<name>.safetensors)")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--preset", choices=tuple(VRAM_PRESETS), default=None,
                   help="GPU memory preset: resolution, batch size, gradient checkpointing, optimizer, fp8/full-bf16, "
                        "max params, caches on disk (options given explicitly take precedence)")
    t.add_argument("--resolution", type=int, default=None, help="default 1024 (or the preset's)")
    t.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="default 1 (or the preset's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--r-init", dest="r_init", type=int, default=LoRA2Config.r_init)
    t.add_argument("--r-target", dest="r_target", type=int, default=LoRA2Config.r_target,
                   help="rank that components the data does not need settle at")
    t.add_argument("--r-max", dest="r_max", type=int, default=LoRA2Config.r_max)
    t.add_argument("--q", type=float, default=LoRA2Config.q)
    t.add_argument("--lambda-r", dest="lambda_r", type=float, default=LoRA2Config.lambda_r)
    t.add_argument("--lambda-e", dest="lambda_e", type=float, default=LoRA2Config.lambda_e)
    t.add_argument("--beta", type=float, default=LoRA2Config.beta)
    t.add_argument("--lr", type=float, default=LoRA2Config.lr)
    t.add_argument("--nu-lr", dest="nu_lr", type=float, default=LoRA2Config.nu_lr,
                   help="learning rate of the rank parameters (0: 25 × --lr)")
    t.add_argument("--resize-every", dest="resize_every", type=int, default=LoRA2Config.resize_every)
    t.add_argument("--targets", default="attn", help="preset (attn, attn+ff, attn+ff+proj, all) or comma list")
    t.add_argument("--mixed-precision", dest="mixed_precision", choices=("no", "fp16", "bf16"), default="bf16")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adamw8bit needs bitsandbytes, prodigy prodigyopt (use --lr 1), lion lion-pytorch, adafactor "
                        "transformers, in sd-scripts' Python")
    t.add_argument("--fp8-base", dest="fp8_base", action="store_true",
                   help="base U-Net weights in fp8 (sd-scripts --fp8_base; needs bf16/fp16 mixed precision)")
    t.add_argument("--full-bf16", dest="full_bf16", action="store_true",
                   help="LoRA weights and gradients in bf16 (sd-scripts --full_bf16; ρ stays float32)")
    t.add_argument("--max-params", dest="max_params", type=int, default=None,
                   help="cap on the LoRA parameters during training, positions allotted by importance (0: none)")
    t.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true")
    t.add_argument("--save-every", dest="save_every", type=int, default=None, help="also save every N steps")
    t.add_argument("--tokenizer-cache-dir", dest="tokenizer_cache_dir", default=None,
                   help="local CLIP tokenizers for offline use (see python -m lora2_train.kohya.tokenizers)")
    t.add_argument("--sd-option", dest="sd_options", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sd-scripts option (repeatable), e.g. --sd-option min_snr_gamma=5")
    t.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                   help="data-parallel processes: accelerate launch --multi_gpu, one per CUDA device")
    t.add_argument("--cpu", action="store_true",
                   help="train on the CPU (with --num-processes N: N CPU processes over gloo; for testing)")
    t.add_argument("--sample-prompts", dest="sample_prompts", default=None,
                   help="text file, one prompt per line (sd-scripts' options such as --w 1024 --h 1024 --s 28 --d 1 "
                        "may follow); images go to <out>/sample/")
    t.add_argument("--sample-every", dest="sample_every", type=int, default=None, help="sample every N steps")
    t.add_argument("--sample-sampler", dest="sample_sampler", choices=SAMPLERS, default="euler_a")
    t.add_argument("--save-state", dest="save_state", action="store_true",
                   help="keep sd-scripts' training state at the end (<name>-state) and at every --save-every")
    t.add_argument("--resume", default=None, help="an sd-scripts state folder (<name>-state, <name>-step<N>-state) "
                   "to continue from, with the same settings")
    t.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    t.set_defaults(func=cmd_train)


def precision_options(fp8_base: bool = False, full_bf16: bool = False) -> dict:
    """sd-scripts options for fp8 base weights and full-bf16 training (only the ones set)."""
    return {k: True for k, v in (("fp8_base", fp8_base), ("full_bf16", full_bf16)) if v}


def _parse_option(text: str):
    if "=" not in text:
        raise ValueError(f"--sd-option {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def cmd_train(args) -> int:
    if args.backend == "embedded":
        raise ValueError("the embedded backend trains inside ComfyUI (LoRA² Train node) or on the random demo model "
                         "(python -m lora2_train demo); use --backend sd-scripts to train on a checkpoint file")
    if not args.sd_scripts:
        raise ValueError("--sd-scripts DIR (or $SD_SCRIPTS_DIR) is required for --backend sd-scripts")
    p = vram_preset(args.preset) if args.preset else {}
    for name, default in (("resolution", 1024), ("batch_size", 1), ("optimizer", "adamw"), ("max_params", 0)):
        if getattr(args, name) is None:
            setattr(args, name, p.get(name, default))
    for name in ("gradient_checkpointing", "fp8_base", "full_bf16"):
        setattr(args, name, getattr(args, name) or p.get(name, False))
    config = LoRA2Config(r_init=args.r_init, r_target=args.r_target, r_max=args.r_max, q=args.q,
                         lambda_r=args.lambda_r, lambda_e=args.lambda_e, beta=args.beta, lr=args.lr,
                         nu_lr=args.nu_lr, resize_every=args.resize_every, targets=args.targets,
                         optimizer=args.optimizer, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                         mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                         max_params=args.max_params)
    extra = precision_options(args.fp8_base, args.full_bf16)
    if args.preset:
        extra.update(cache_options(config))
    extra.update(_parse_option(o) for o in args.sd_options)
    prompts = None
    if args.sample_prompts:
        if not Path(args.sample_prompts).is_file():
            raise FileNotFoundError(f"--sample-prompts {args.sample_prompts}: no such file")
        prompts = Path(args.sample_prompts).read_text(encoding="utf-8")
        if not args.sample_every:
            raise ValueError("--sample-prompts needs --sample-every N")
    path = train_sd_scripts(args.sd_scripts, args.checkpoint, args.dataset, args.out, args.name, config, args.steps,
                            args.resolution, args.batch_size, args.seed, python=args.sd_python,
                            callback=progress_bar(args.steps), overwrite=args.overwrite,
                            tokenizer_cache_dir=args.tokenizer_cache_dir, save_every=args.save_every,
                            extra_options=extra, num_processes=args.num_processes, cpu=args.cpu,
                            sample_prompts=prompts, sample_every=args.sample_every,
                            sample_sampler=args.sample_sampler, resume_from=args.resume, save_state=args.save_state)
    print(path)
    return 0
