"""One run's progress in ComfyUI: progress bar, live messages to the chart, files saved, peak memory."""
from __future__ import annotations

from .. import _comfy


def block_means(ranks) -> dict:
    """Mean rank per U-Net block, rounded for the chart's messages."""
    from lora2_train.plot import mean_rank_by_block

    return {k: round(float(v), 3) for k, v in mean_rank_by_block(ranks).items()}


class Run:
    """Progress bar + live messages of one node run; the files it saved; peak device memory."""

    def __init__(self, node_id, total):
        import comfy.utils

        self.node_id, self.total = node_id, total
        self.saved_as = None  # the final file, once written
        self.cache_report = ""  # what the on-disk cache gave (lora2_train.cache.EncodeCache.report)
        self.snapshots: list[str] = []
        self.new_samples: list[dict] = []  # image references of samples not yet sent to the chart
        self.device = None
        self.bar = comfy.utils.ProgressBar(total)
        self.send(status="started", step=0)

    def watch_memory(self, device):
        """Start measuring the peak memory allocated on `device` (CUDA only)."""
        import torch

        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_available():
            self.device = device
            torch.cuda.reset_peak_memory_stats(device)

    def memory(self) -> dict:
        """``{"peak_memory_mb": …}`` since :meth:`watch_memory` (torch.cuda.max_memory_allocated), or {}."""
        import torch

        if self.device is None:
            return {}
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)}

    def send(self, **data):
        _comfy.send(_comfy.PROGRESS_EVENT, {"node": self.node_id, "total": self.total, **data})

    def step(self, ev):
        import comfy.model_management as mm

        try:  # ComfyUI's progress hook raises on Cancel; the trainer's should_stop handles it at the next step
            self.bar.update_absolute(ev.step, ev.total)
        except mm.InterruptProcessingException:
            mm.interrupt_current_processing(True)
        self.send(status="running", step=ev.step, loss=ev.loss, mse=ev.mse, reg=ev.reg, entropy=ev.entropy,
                  num_params=ev.num_params, elapsed=ev.elapsed, ranks_by_block=block_means(ev.ranks), lr=ev.lr,
                  **self.take_samples(), **self.memory())

    def take_samples(self) -> dict:
        """``{"samples": [references]}`` of the samples not sent yet (drawn before this message), or {}."""
        if not self.new_samples:
            return {}
        refs, self.new_samples = self.new_samples, []
        return {"samples": refs}


def info_line(out, requested, adapter, history, run) -> str:
    """One line for the node's info output: the file written (and why its name differs), size, memory."""
    from lora2_train.format import output_path

    wanted = output_path(out.parent, requested).name
    text = f"saved {out.name}" + (f" ({wanted} was taken)" if wanted != out.name else "")
    text += f": {len(adapter.modules)} modules, {adapter.num_parameters():,} parameters"
    if history:
        text += f", {history[-1]['step']} steps, last loss {history[-1]['loss']:.4g}"
    if run.snapshots:
        text += f"; snapshots {', '.join(run.snapshots)}"
    if run.cache_report:
        text += f"; {run.cache_report}"
    mem = run.memory()
    if mem:
        text += f"; peak GPU memory {mem['peak_memory_mb']:.0f} MiB"
    return text
