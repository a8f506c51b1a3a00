"""Multi-process training: every process must re-allocate identically.

With data parallelism (sd-scripts under ``accelerate launch``, or the embedded
trainer under ``torchrun``) each process holds its own copy of the LoRA² network
and sees different data.  The copies stay equal because the gradients of every
parameter (ρ included, so ν too) are averaged across processes before each
optimizer step, and because the rows of A a component grows are drawn from a
generator seeded by (run seed, component name, position) (:func:`layer.row_seed`),
never from the process's own RNG.  The run seed itself must be one for all
processes: sd-scripts without ``--seed`` seeds every process differently, so the
network takes process 0's (:func:`from_main_process`).  :func:`check_in_sync`
verifies all this at every re-allocation with one small all-reduce: the ranks each
process is about to allocate and the row seeds of every component must be equal
everywhere, and the checksums of ν and of the LoRA weights must agree.  A disagreement stops the run with one line
(:class:`ProcessesDiverged`) instead of letting shapes drift apart, which would
end in a hang or a crash inside the next gradient all-reduce.
"""
from __future__ import annotations

import torch

#: relative tolerance of the float checksums (ν, weights): the averaged gradients are bitwise equal on
#: every process, so equal copies give equal sums; the tolerance only absorbs summation-order noise
CHECKSUM_RTOL = 1e-6


class ProcessesDiverged(RuntimeError):
    """The processes of a multi-process run hold different LoRA² networks."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment): NCCL when CUDA
    is available, gloo otherwise.  Returns (rank, world size); (0, 1) outside torchrun."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


#: elements per all-reduce when gradients are averaged (one flat buffer per bucket)
BUCKET_NUMEL = 1 << 25


@torch.no_grad()
def average_gradients(params) -> None:
    """Mean of every parameter's gradient over the processes, in place (a missing gradient counts as
    zero and is created), in a few flat all-reduces.  No-op in a single process."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, numel = [], 0
    for i, p in enumerate(params):
        bucket.append(p)
        numel += p.numel()
        if numel >= BUCKET_NUMEL or i == len(params) - 1:
            by_dtype = {}
            for q in bucket:
                by_dtype.setdefault((q.grad.dtype, q.grad.device), []).append(q)
            for group in by_dtype.values():
                flat = torch.cat([q.grad.reshape(-1) for q in group])
                dist.all_reduce(flat)
                flat /= size
                offset = 0
                for q in group:
                    q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                    offset += q.numel()
            bucket, numel = [], 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, …] on every process; [obj] in a single process."""
    rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_true(flag: bool) -> bool:
    """True when `flag` is true on every process (a MIN all-reduce); `flag` itself in a single process."""
    rank, size = world()
    if size == 1:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def from_main_process(value: int) -> int:
    """Process 0's integer `value` on every process (a broadcast); `value` itself in a single process."""
    rank, size = world()
    if size == 1:
        return int(value)
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def any_true(flag: bool) -> bool:
    """True when `flag` is true on some process (a MAX all-reduce)."""
    return not all_true(not flag)


@torch.no_grad()
def digest(network, ranks: dict[str, int]) -> torch.Tensor:
    """[rank of every component in layer order…, row seed of every component…, Σ ν, Σ_ℓ (ΣA_ℓ + ΣB_ℓ)] in
    float64 (the seeds are below 2⁵³, so exact)."""
    nu = network.nu_vector().detach().double()
    weights = network.weight_parameters()
    wsum = torch.stack([p.detach().double().sum() for p in weights]).sum() if weights else nu.new_zeros(())
    r = torch.tensor([float(ranks[k]) for k in network.layers], dtype=torch.float64)
    seeds = torch.tensor([float(layer.seed) for layer in network.layers.values()], dtype=torch.float64)
    return torch.cat([r, seeds, nu.sum().reshape(1).cpu(), wsum.reshape(1).cpu()])


def check_in_sync(network, step: int, ranks: dict[str, int]) -> None:
    """Raise :class:`ProcessesDiverged` (on every process) unless all processes are about to allocate
    the same `ranks`, draw new rows of A from the same seeds and hold the same ν and weights (checksums).
    No-op in a single process."""
    rank, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    d = digest(network, ranks)
    both = torch.cat([d, -d]).to(_collective_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    both = both.cpu()
    hi, lo = both[:d.numel()], -both[d.numel():]
    n = len(network.layers)
    keys = list(network.layers)
    problems, cause = [], ("the network's gradients are not averaged across processes "
                           "(or a process changed it on its own)")
    for start, what in ((0, "ranks"), (n, "row seeds of A")):
        bad = (hi[start:start + n] != lo[start:start + n]).nonzero().flatten().tolist()
        if bad:
            i = start + bad[0]
            problems.append(f"the {what} of {len(bad)} components differ (first: {keys[bad[0]]}, "
                            f"{int(lo[i])} vs {int(hi[i])})")
            if start:  # the weights then differ too: the rows grown so far were drawn apart
                cause = "each process's network was built with its own seed"
    for i, what in ((2 * n, "ν"), (2 * n + 1, "weight")):
        scale = max(abs(float(hi[i])), abs(float(lo[i])), 1e-12)
        if float(hi[i] - lo[i]) > CHECKSUM_RTOL * scale:
            problems.append(f"the {what} checksums differ ({float(lo[i]):.9g} vs {float(hi[i]):.9g})")
    if problems:
        raise ProcessesDiverged(
            f"LoRA² re-allocation at step {step}: the {size} processes disagree: {'; '.join(problems)}; {cause}")
