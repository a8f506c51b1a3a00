"""The embedded LoRA² trainer (spec §3): model-agnostic, in-process.

It takes a UNet-like callable ``model(x_t, t, **cond) → ε̂``, a
:class:`LoRA2Network` already injected into it, a dataset of (latents, text
conditioning) and a noise schedule, and minimizes

    L_total = L_MSE + λ_r · (mean|ν − ν_target| + β · mean(‖A‖²+‖B‖²)/numel) + λ_e · L_entropy

with the configured optimizer (:mod:`lora2_train.optim`), re-allocating every component at D(ν) every
``resize_every`` optimizer steps (never after the last step: the adapter a run
ends with is the one that gave its last loss).  Checkpoints hold ν, weights,
optimizer, step and RNG.  ``on_sample(step)`` (every ``sample_every`` optimizer
steps, process 0, before any re-allocation; not after a stop request) draws
samples without touching training: no autograd, entropy hooks paused, gradient
checkpointing off, global RNG state restored.

One optimizer step draws ``batch_size · gradient_accumulation_steps`` examples
(with their noise and timesteps) at once and runs them as
``gradient_accumulation_steps`` micro-batches whose losses are averaged, so
accumulation gives the step one batch of that size would.  The error is taken
against ε or v (``prediction_type``), optionally min-SNR weighted and
pseudo-Huber; the gradient norm is clipped at ``max_grad_norm`` and the
learning rates follow ``lr_scheduler`` (see :mod:`lora2_train.lr_schedule`).

Several processes (``torchrun --nproc_per_node N``; call
:func:`lora2_train.distributed.init_from_env` first, give each process its
device): every process draws its own batches (data seed = run seed on process
0, derived from it elsewhere), the gradients of the network are averaged over
the processes after each step's backward passes (one flat all-reduce per bucket, as
sd-scripts does; the network is not called as a module, so DDP's own hooks
would not fire), every re-allocation checks that all processes agree
(:func:`lora2_train.distributed.check_in_sync`), a stop request or a non-finite
loss on any process stops all of them at the same step, and only process 0
reports progress and writes checkpoints (with every process's data RNG).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import distributed as D
from .config import LoRA2Config
from .format import atomic_write_bytes
from .network import LoRA2Network
from .lr_schedule import lr_multiplier
from .objective import CrossAttentionEntropy, DDPMSchedule, diffusion_loss, lora2_loss, min_snr_weights, record_loss
from .optim import build_optimizer

CHECKPOINT_FORMAT = "lora2-checkpoint"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; training stopped and the last good checkpoint was kept."""


@dataclass
class ProgressEvent:
    """What the trainer reports after every step (CLI progress bar, ComfyUI node, live chart)."""

    step: int
    total: int
    loss: float
    mse: float
    reg: float
    entropy: float
    ranks: dict[str, int]
    num_params: int
    resized: dict[str, tuple[int, int]]
    elapsed: float
    lr: float = float("nan")  # learning rate of the LoRA weights at this step
    grad_norm: float = float("nan")  # gradient norm before clipping (nan when clipping is off)


def history_point(ev: ProgressEvent, resize_every: int) -> dict | None:
    """The rank history's point of a step, or None: the first step, steps that re-allocated or fall on the
    re-allocation period, and the last step keep ``{"step", "ranks", "loss"}``."""
    if ev.step == 1 or ev.resized or ev.step % resize_every == 0 or ev.step == ev.total:
        return {"step": ev.step, "ranks": dict(ev.ranks), "loss": float(ev.loss)}
    return None


@dataclass
class TrainResult:
    steps: int
    stopped: bool
    ranks: dict[str, int]
    nus: dict[str, float]
    num_params: int
    last: ProgressEvent | None
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None


class SampledDataset:
    """Samples batches from a finite list of examples ``{"latents": (C,H,W), "cond": {name: tensor}}``.

    Examples of different latent sizes (aspect-ratio buckets) are grouped by size and every batch comes
    from one group: a first uniform draw over all examples picks the group (so a group is chosen in
    proportion to its size), then the batch is drawn uniformly within it.  With one size this is a plain
    uniform draw over the examples."""

    def __init__(self, examples: Sequence[dict]):
        if len(examples) == 0:
            raise ValueError("dataset is empty: no (latents, conditioning) examples to train on")
        self.examples = list(examples)
        groups: dict[tuple, list[int]] = {}
        for i, ex in enumerate(self.examples):
            groups.setdefault(tuple(ex["latents"].shape), []).append(i)
        self.groups = list(groups.values())
        self._group_of = {i: g for g in self.groups for i in g}

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        if len(self.groups) == 1:
            idx = torch.randint(0, len(self.examples), (batch_size,), generator=generator).tolist()
        else:
            group = self._group_of[int(torch.randint(0, len(self.examples), (1,), generator=generator))]
            idx = [group[i] for i in torch.randint(0, len(group), (batch_size,), generator=generator).tolist()]
        items = [self.examples[i] for i in idx]
        cond = {k: torch.stack([it["cond"][k] for it in items]) for k in items[0]["cond"]}
        return {"latents": torch.stack([it["latents"] for it in items]), "cond": cond}


class Trainer:
    """Runs LoRA² training; see the module docstring for the objective."""

    def __init__(self, model: Callable, network: LoRA2Network, dataset, config: LoRA2Config,
                 schedule: DDPMSchedule | None = None, teacher: Callable | None = None,
                 out_dir: str | Path | None = None, callback: Callable[[ProgressEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, device: str | torch.device = "cpu",
                 entropy_root: torch.nn.Module | None = None, on_save: Callable[[int], None] | None = None,
                 on_sample: Callable[[int], object] | None = None, sample_every: int = 0):
        self.model, self.network, self.config = model, network, config.validate()
        self.dataset = dataset if hasattr(dataset, "sample") else SampledDataset(dataset)
        self.schedule = schedule or DDPMSchedule(zero_terminal_snr=config.zero_terminal_snr)
        # called with the step every ``save_every_n_steps`` optimizer steps (before any re-allocation)
        self.on_save = on_save
        # called with the step every ``sample_every`` optimizer steps (process 0, before any re-allocation), in
        # isolation: see _sample
        if not isinstance(sample_every, int) or sample_every < 0:
            raise ValueError(f"sample_every must be a non-negative integer, got {sample_every!r}")
        self.on_sample, self.sample_every = on_sample, sample_every
        self.teacher = teacher
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callback, self.should_stop = callback, should_stop
        self.device = torch.device(device)
        self.rank, self.world_size = D.world()
        self.generator = torch.Generator().manual_seed(self._data_seed())
        self.step = 0
        self.history: list[dict] = []
        self.optimizer = self._make_optimizer()
        self.entropy = None
        if config.lambda_e > 0:
            root = entropy_root if entropy_root is not None else model
            if not isinstance(root, torch.nn.Module):
                raise ValueError("lambda_e > 0 needs entropy_root: the nn.Module holding the cross-attentions")
            self.entropy = CrossAttentionEntropy(root, config.entropy_queries, seed=config.seed)
            if self.entropy.num_layers == 0:
                raise ValueError("lambda_e > 0 but the model has no cross-attention (attn2) with to_q/to_k")
        if config.gradient_checkpointing:
            enable = getattr(model, "enable_gradient_checkpointing", None)
            if enable is None:
                raise ValueError("gradient_checkpointing: the model has no enable_gradient_checkpointing()")
            enable()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16"
                                           and self.device.type == "cuda")

    def _data_seed(self) -> int:
        """The run seed on process 0 (a single-process run is unchanged); another seed per other process."""
        return self.config.seed if self.rank == 0 else (self.config.seed * 1_000_003 + 7919 * self.rank) % 2 ** 63

    def _make_optimizer(self):
        """``config.optimizer`` over the network's groups (:func:`lora2_train.optim.build_optimizer`;
        ρ keeps its own rate ``nu_lr`` under every optimizer, text-encoder LoRA weights ``text_encoder_lr``)."""
        c = self.config
        groups = self.network.param_groups()  # U-Net LoRA weights (text-encoder ones at text_encoder_lr), ρ
        for g in groups:
            if g.get("name") != "nu":
                g["weight_decay"] = c.weight_decay
        opt = build_optimizer(c.optimizer, groups, c.lr, **dict(c.extra.get("optimizer_args", {})))
        self._base_lrs = [g["lr"] for g in opt.param_groups]  # lr_scheduler multiplies these
        return opt

    def _set_lr(self) -> float:
        """Learning rates of the optimizer step about to be taken (index self.step)."""
        c = self.config
        m = lr_multiplier(c.lr_scheduler, self.step, c.lr_warmup_steps, c.steps)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * m
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    def save_checkpoint(self, path: str | Path | None = None, gather: bool = True) -> Path | None:
        """Write the checkpoint (process 0 only; with several processes every process must call this,
        unless ``gather=False``: then process 0 writes its own data RNG only, and the others restart theirs
        from their seed on resume).  Returns the path (None on other processes)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no out_dir: cannot save a checkpoint")
        rng_data = D.gather_objects(self.generator.get_state()) if gather else [self.generator.get_state()]
        if self.rank != 0:
            if gather:
                D.barrier()  # returns once process 0 has written the file
            return None
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": json.dumps(self.config.to_dict(), default=str),
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),  # fp16 loss scale and its growth count ({} when unused)
            "rng_torch": torch.get_rng_state(),
            "rng_data": self.generator.get_state(),
            "rng_data_processes": rng_data,
            # the entropy term's query subsets (every process starts this stream from the same seed)
            "rng_entropy": self.entropy.generator.get_state() if self.entropy is not None else None,
            "history": json.dumps(self.history),
        }
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        written = atomic_write_bytes(path, buf.getvalue(), overwrite=True)
        if gather:
            D.barrier()
        return written

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume: ν, weights (at their saved ranks), optimizer state, fp16 loss scale, step, RNG (torch, data,
        entropy query subsets) and rank history.  The learning-rate schedule follows from the step."""
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable LoRA² checkpoint ({e})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a LoRA² checkpoint (field 'format' missing)")
        saved = json.loads(state["config"])
        same = {"adam": "adamw"}  # Adam and AdamW keep the same state
        for name in ("q", "r_max", "targets", "optimizer"):
            mine = self.config.to_dict()[name]
            theirs = saved.get(name)
            if name == "optimizer":
                theirs, mine = same.get(theirs, theirs), same.get(mine, mine)
            if theirs != mine:
                raise ValueError(f"{path}: checkpoint field {name!r}={saved.get(name)!r} differs from this run's {mine!r}")
        self.network.load_state(state["network"])
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng_torch"])
        per_process = state.get("rng_data_processes") or [state["rng_data"]]
        if self.rank < len(per_process) and len(per_process) in (1, self.world_size):
            self.generator.set_state(per_process[self.rank])
        else:  # saved by another number of processes: this one starts its data stream from its seed
            self.generator.manual_seed(self._data_seed() + self.step)
        if self.entropy is not None:
            saved_entropy = state.get("rng_entropy")
            if saved_entropy is not None:
                self.entropy.generator.set_state(saved_entropy)
            else:  # no saved stream (λ_e was 0 or an older checkpoint): one that depends on the step
                self.entropy.generator.manual_seed(self.config.seed + self.step)
        self.history = json.loads(state["history"])

    # ---- one step ----------------------------------------------------------------------------
    def _draw(self):
        """The examples, noise and timesteps of one optimizer step: batch_size · gradient_accumulation_steps."""
        c = self.config
        b = self.dataset.sample(c.batch_size * c.gradient_accumulation_steps, self.generator)
        x0 = b["latents"]
        x_t, t, noise = self.schedule.noisy(x0, self.generator, noise_offset=c.noise_offset)
        return x0, x_t, t, noise, b["cond"]

    def _losses(self, x0, x_t, t, noise, cond):
        """(total, diffusion loss, L_reg, L_entropy) of one micro-batch (tensors still on the CPU)."""
        c = self.config
        dev = self.device
        x0, x_t, t, noise = x0.to(dev), x_t.to(dev), t.to(dev), noise.to(dev)
        cond = {k: v.to(dev) for k, v in cond.items()}
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x_t, t, **cond)
        elif c.prediction_type == "v_prediction":
            target = self.schedule.v_target(x0, noise, t)
        else:
            target = noise
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.mixed_precision)
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = self.model(x_t, t, **cond)
        weights = None
        if c.min_snr_gamma > 0:
            weights = min_snr_weights(self.schedule.snr(t), c.min_snr_gamma, c.prediction_type)
        mse = diffusion_loss(pred, target, c.loss_type, c.huber_c, weights)
        total, reg, ent = lora2_loss(mse, self.network, c, self.entropy.loss() if self.entropy is not None else None,
                                     record=False)  # L_ref gets the step's mean data loss (_optimizer_step)
        return total, mse, reg, ent

    def _optimizer_step(self):
        """Forward/backward over the micro-batches, clip, step.  Returns the mean (total, mse, reg, entropy)
        over the micro-batches and the gradient norm before clipping."""
        c = self.config
        k = c.gradient_accumulation_steps
        x0, x_t, t, noise, cond = self._draw()
        n = c.batch_size
        sums = torch.zeros(4, dtype=torch.float64)
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(k):
            part = slice(i * n, (i + 1) * n)
            if self.entropy is not None:
                self.entropy.reset(keep_subsets=i > 0)  # one query subset per layer and optimizer step
            total, mse, reg, ent = self._losses(x0[part], x_t[part], t[part], noise[part],
                                                {name: v[part] for name, v in cond.items()})
            finite = bool(torch.isfinite(total))
            if not (D.all_true(finite) if self.world_size > 1 else finite):  # every process stops together
                where = f"; last good checkpoint: {self.checkpoint_path}" if self._has_checkpoint() else ""
                what = f"loss became {total.item()}" if not finite else "the loss of another process became NaN/Inf"
                raise TrainingDiverged(
                    f"{what} at step {self.step + 1} (mse={mse.item():.4g}, "
                    f"reg={reg.item():.4g}, entropy={ent.item():.4g}); training stopped{where}")
            self.scaler.scale(total / k if k > 1 else total).backward()
            sums += torch.tensor([total.item(), mse.item(), reg.item(), ent.item()], dtype=torch.float64)
        record_loss(self.network, sums[1] / k)
        D.average_gradients(self.network.parameters())  # a no-op on one process
        grad_norm = float("nan")
        if c.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return [float(v) / k for v in sums], grad_norm

    def train(self, resume_from: str | Path | None = None) -> TrainResult:
        c = self.config
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if not self.history:
            self.history.append({"step": self.step, "ranks": self.network.ranks()})
        start_time = time.perf_counter()
        stopped, last = False, None
        self.network.train()
        try:
            while self.step < c.steps:
                stop = self.should_stop is not None and self.should_stop()
                if D.any_true(stop) if self.world_size > 1 else stop:  # every process stops at the same step
                    stopped = True
                    break
                lr = self._set_lr()
                (total, mse, reg, ent), grad_norm = self._optimizer_step()
                self.step += 1
                if c.save_every_n_steps and self.on_save is not None and self.rank == 0 \
                        and self.step % c.save_every_n_steps == 0 and self.step < c.steps:  # the last step's adapter is the run's own file
                    self.on_save(self.step)
                if self.on_sample is not None and self.sample_every and self.rank == 0 \
                        and self.step % self.sample_every == 0 \
                        and not (self.should_stop is not None and self.should_stop()):  # none after a Cancel
                    self._sample()
                resized = {}
                # no re-allocation after the last step: the saved adapter is the one that gave the last loss
                if self.step % c.resize_every == 0 and self.step < c.steps:
                    targets = self.network.target_ranks()
                    D.check_in_sync(self.network, self.step, targets)
                    resized = self.network.resize(self.optimizer, targets=targets)
                if self.step % c.resize_every == 0 or self.step == c.steps:
                    self.history.append({"step": self.step, "ranks": self.network.ranks()})
                last = ProgressEvent(self.step, c.steps, total, mse, reg, ent, self.network.ranks(),
                                     self.network.num_parameters(), resized, time.perf_counter() - start_time,
                                     lr=lr, grad_norm=grad_norm)
                if self.callback is not None and self.rank == 0:
                    self.callback(last)
                if self.out_dir is not None and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if self.out_dir is not None:
                self.save_checkpoint(gather=False)  # other processes may be anywhere: no collective here
            raise
        finally:
            self.close()
        if self.out_dir is not None and (stopped or self.step == c.steps):
            self.save_checkpoint()
        return TrainResult(self.step, stopped, self.network.ranks(), self.network.nus(),
                           self.network.num_parameters(), last, self.history,
                           self.checkpoint_path if self.out_dir is not None else None)

    def _sample(self) -> None:
        """``on_sample(step)`` without any effect on training: under ``torch.no_grad``, with the entropy hooks
        paused (nothing recorded, no query subset drawn), the model's gradient checkpointing switched off
        (when it has ``disable_gradient_checkpointing``) and the global RNG state of the CPU and of every
        initialized CUDA device restored afterwards; the data generator is the trainer's own and is not
        passed on."""
        model = self.model
        toggle = self.config.gradient_checkpointing and hasattr(model, "disable_gradient_checkpointing")
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = list(range(torch.cuda.device_count())) if cuda else []
        paused = self.entropy.paused() if self.entropy is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), paused:
            if toggle:
                model.disable_gradient_checkpointing()
            try:
                self.on_sample(self.step)
            finally:
                if toggle:
                    model.enable_gradient_checkpointing()
                self.network.clear_lam()  # Λ computed without autograd: the next training call recomputes it

    def close(self) -> None:
        """Remove the hooks this trainer put on the model (entropy hooks); safe to call twice."""
        if self.entropy is not None:
            self.entropy.remove()

    def _has_checkpoint(self) -> bool:
        return self.checkpoint_path is not None and self.checkpoint_path.exists()
