"""sd-scripts trainer extension: ``python -m lora2_train.kohya.train --sd_scripts DIR <sd-scripts options>``.

Imports sd-scripts from DIR (or ``$SD_SCRIPTS_DIR``), subclasses its SDXL
network trainer and, through the trainer's ``process_batch`` hook, adds the
LoRA² terms to the loss of every training batch (spec §3):

    L_total = L_sd-scripts + λ_r · (mean|ν − ν_target| + β · mean(‖A‖²+‖B‖²)/numel) + λ_e · L_entropy

L_sd-scripts is sd-scripts' own loss (MSE or Huber, min-SNR, masks,
weighting… all its options keep working).  L_entropy is the cross-attention
entropy collected by hooks on every ``attn2.to_q`` / ``to_k``.  Ranks are
re-allocated by the network module after optimizer steps.  Every step prints
one line ``LORA2_PROGRESS {json}`` (step, total, loss, mse, reg, entropy,
num_params, resized, elapsed, and ranks when they may have changed), every save
``LORA2_SAVED {json}`` (path, step, ranks).  SIGTERM saves the current adapter as
``<output_name>-step<NNNNNNNN>.safetensors`` after the running step and, with
``--save_state`` or ``--save_state_on_train_end``, sd-scripts' training state
(network with its ragged ranks and step count, optimizer, scheduler, RNG) as
``<output_name>-step<NNNNNNNN>-state`` (``LORA2_STATE {json}``), then exits;
``--resume`` that folder continues the run.

Several processes (``accelerate launch --num_processes N``): sd-scripts averages
the network's gradients and the network draws grown rows of A from process 0's
seed (with or without ``--seed``), so every process holds the same network; the
network checks that at every re-allocation (:func:`lora2_train.distributed.check_in_sync`).
Only the main process prints progress and writes files; a stop request is
agreed on by all processes at the start of a step, so they all stop after the
same one.
"""
from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time

from ..config import ConfigError
from ..distributed import ProcessesDiverged, any_true
from ..format import AdapterFormatError
from ..objective import CrossAttentionEntropy, lora2_loss
from ..optim import check_sd_scripts_optimizer, sd_scripts_optimizer_type
from . import network as kn
from .launch import ERROR_PREFIX, PROGRESS_PREFIX, SAVED_PREFIX, STATE_PREFIX, SdScriptsError, check_sd_scripts

#: trainer methods the extension relies on
REQUIRED_HOOKS = ("process_batch", "assert_extra_args", "train")
#: parameters of NetworkTrainer.process_batch the extension reads
PROCESS_BATCH_PARAMS = ("network", "unet", "accelerator", "args", "is_train")
_SAVE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}


def import_sd_scripts(folder):
    """Import sd-scripts' ``sdxl_train_network`` and ``library.train_util`` from `folder` and check the hooks."""
    folder = check_sd_scripts(folder)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        import sdxl_train_network
        from library import train_util
    except ImportError as e:
        raise SdScriptsError(f"{folder}: sd-scripts cannot be imported ({e}); install its requirements: "
                             f"{sys.executable} -m pip install -r {folder / 'requirements.txt'}") from None
    base = sdxl_train_network.SdxlNetworkTrainer
    missing = [h for h in REQUIRED_HOOKS if not callable(getattr(base, h, None))]
    if missing:
        raise SdScriptsError(f"{folder}: SdxlNetworkTrainer lacks {missing[0]}(), which LoRA² hooks into; "
                             f"use a current sd-scripts checkout")
    params = inspect.signature(base.process_batch).parameters
    absent = [p for p in PROCESS_BATCH_PARAMS if p not in params]
    if absent:
        raise SdScriptsError(f"{folder}: NetworkTrainer.process_batch has no parameter {absent[0]!r}; "
                             f"this sd-scripts version is not supported")
    return sdxl_train_network, train_util


def _emit(prefix: str, payload: dict) -> None:
    print(prefix + json.dumps(payload, separators=(",", ":")), flush=True)


def _network_config(args):
    kwargs = dict(a.split("=", 1) for a in (args.network_args or []))
    return kn.make_config(args.network_dim, kwargs)


def make_trainer_class(base):
    """Subclass of sd-scripts' SDXL network trainer adding the LoRA² loss terms and progress lines."""
    signature = inspect.signature(base.process_batch)

    class LoRA2SdxlNetworkTrainer(base):
        def __init__(self):
            super().__init__()
            self._lora2_net = None
            self._entropy = None
            self._last = (float("nan"),) * 4
            self._t0 = None
            self._args = None
            self._accelerator = None
            self._is_main = True
            self.stop_requested = False

        # -- argument checks before anything heavy happens --
        def assert_extra_args(self, args, *rest, **kw):
            super().assert_extra_args(args, *rest, **kw)
            if args.network_module != kn.NETWORK_MODULE_NAME:
                raise ConfigError(f"--network_module must be {kn.NETWORK_MODULE_NAME} for LoRA² training, "
                                  f"got {args.network_module!r}")
            try:
                check_sd_scripts_optimizer(sd_scripts_optimizer_type(args))
            except ValueError as e:
                raise ConfigError(str(e)) from None
            config = _network_config(args)
            if config.lambda_e > 0 and args.gradient_checkpointing:
                raise ConfigError("lambda_e > 0 with --gradient_checkpointing: sd-scripts recomputes blocks "
                                  "outside autograd, so the entropy term would get no gradient; drop one of them")
            self._args = args

        # -- the loss hook --
        def process_batch(self, *a, **kw):
            bound = signature.bind(self, *a, **kw)
            bound.apply_defaults()
            p = bound.arguments
            accelerator = p["accelerator"]
            net = accelerator.unwrap_model(p["network"])
            if not isinstance(net, kn.KohyaLoRA2Network):
                return super().process_batch(*a, **kw)
            if self._lora2_net is not net:
                self._attach(net, accelerator.unwrap_model(p["unet"]), p["args"], accelerator)
                net.grad_scaler = getattr(accelerator, "scaler", None)
            if p["is_train"]:
                self._stop_here(net)
            if self._entropy is not None:
                self._entropy.reset()
            loss = super().process_batch(*a, **kw)
            if not p["is_train"]:
                return loss
            total, reg, ent = lora2_loss(loss, net, net.config,
                                         self._entropy.loss() if self._entropy is not None else None)
            self._last = (float(total.detach()), float(loss.detach()), float(reg.detach()), float(ent.detach()))
            return total

        def _stop_here(self, net):
            """At the start of a training step (the previous one complete: optimizer, scheduler): stop when
            any process was asked to (all of them agree, one all-reduce), or when a resumed run has done
            all its steps (sd-scripts may schedule a few more after a resume)."""
            if any_true(self.stop_requested):
                self._save_and_exit(net.steps)
            if net.final_step is not None and net.steps >= net.final_step:
                self._save_and_exit(net.steps, finished=True)

        def _attach(self, net, unet, args, accelerator=None):
            self._lora2_net, self._args = net, args
            self._accelerator = accelerator
            self._is_main = bool(getattr(accelerator, "is_main_process", True))
            net.final_step = int(args.max_train_steps)
            self._t0 = time.perf_counter()
            net.step_listeners.append(self._on_step)
            net.save_listeners.append(self._on_save)
            if net.config.lambda_e > 0:
                self._entropy = CrossAttentionEntropy(unet, net.config.entropy_queries, seed=net.config.seed)
                if self._entropy.num_layers == 0:
                    raise ConfigError("lambda_e > 0 but the U-Net has no cross-attention (attn2) with to_q/to_k")

        def _on_step(self, step, resized):
            net, args = self._lora2_net, self._args
            total = int(args.max_train_steps)
            loss, mse, reg, ent = self._last
            event = {"step": step, "total": total, "loss": loss, "mse": mse, "reg": reg, "entropy": ent,
                     "num_params": net.num_parameters(), "resized": {k: list(v) for k, v in resized.items()},
                     "elapsed": round(time.perf_counter() - self._t0, 3)}
            if step == 1 or resized or step >= total:
                event["ranks"] = net.ranks()
            if self._is_main:
                _emit(PROGRESS_PREFIX, event)

        def _on_save(self, path, ranks):
            if self._is_main:
                _emit(SAVED_PREFIX, {"path": os.path.abspath(path), "step": self._lora2_net.steps, "ranks": ranks})

        def _save_and_exit(self, step, finished=False):
            """Main process: the adapter (``<name>-step<N>``, or ``<name>`` when the run is complete) and,
            when sd-scripts is told to keep state, the training state beside it; then every process exits."""
            import torch
            args = self._args
            stem = args.output_name or ("last" if finished else "at")
            if self._is_main:
                name = stem if finished else f"{stem}-step{step:08d}"
                dtype = getattr(torch, _SAVE_DTYPES.get(args.save_precision or "float", "float32"))
                meta = {"ss_output_name": args.output_name, "ss_steps": step,
                        "ss_base_model_version": "sdxl_base_v1-0"}
                self._lora2_net.save_weights(os.path.join(args.output_dir, name + ".safetensors"), dtype, meta)
                if self._accelerator is not None and (getattr(args, "save_state", False)
                                                      or getattr(args, "save_state_on_train_end", False)):
                    state_dir = os.path.join(args.output_dir, f"{stem}-state" if finished else f"{name}-state")
                    self._accelerator.save_state(state_dir)
                    set_state_step(state_dir, step)
                    _emit(STATE_PREFIX, {"path": os.path.abspath(state_dir), "step": step})
            if self._accelerator is not None:
                self._accelerator.wait_for_everyone()
            raise SystemExit(0 if finished else 143)

    return LoRA2SdxlNetworkTrainer


def set_state_step(state_dir, step: int) -> None:
    """Write the optimizer step count into sd-scripts' ``train_state.json`` of a saved state.

    sd-scripts' save hook records its loop counter + 1, which is one ahead when the state is saved at
    the start of a step (where a stop request is honoured); ``--resume`` with
    ``--skip_until_initial_step`` skips that many batches."""
    path = os.path.join(state_dir, "train_state.json")
    data = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    data["current_step"] = int(step)
    data.setdefault("current_epoch", 0)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _split_sd_scripts_option(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, folder, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a in ("--sd_scripts", "--sd-scripts") and i + 1 < len(argv):
            folder, i = argv[i + 1], i + 2
            continue
        if a.startswith(("--sd_scripts=", "--sd-scripts=")):
            folder = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return folder or os.environ.get("SD_SCRIPTS_DIR"), rest


def main(argv=None) -> int:
    folder, argv = _split_sd_scripts_option(list(sys.argv[1:] if argv is None else argv))

    def fail(msg) -> int:
        print(f"{ERROR_PREFIX}{msg}", file=sys.stderr, flush=True)
        return 2

    if not folder:
        return fail("no sd-scripts folder: pass --sd_scripts DIR or set SD_SCRIPTS_DIR")
    try:
        sdxl_train_network, train_util = import_sd_scripts(folder)
    except SdScriptsError as e:
        return fail(str(e))
    parser = sdxl_train_network.setup_parser()
    sys.argv = [sys.argv[0]] + argv  # sd-scripts re-reads sys.argv when it merges --config_file
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    if not args.network_module:
        args.network_module = kn.NETWORK_MODULE_NAME
    trainer = make_trainer_class(sdxl_train_network.SdxlNetworkTrainer)()

    def on_term(signum, frame):
        if trainer._lora2_net is None or trainer._lora2_net.optimizer is None:
            raise SystemExit(143)  # nothing trained yet: nothing to keep
        trainer.stop_requested = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        trainer.train(args)
    except (ConfigError, AdapterFormatError, SdScriptsError, ProcessesDiverged, FileNotFoundError) as e:
        return fail(str(e).strip().splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
