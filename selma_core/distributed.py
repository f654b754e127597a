"""Several processes, one job: the little of ``torch.distributed`` that data-parallel training needs.

A job started by ``torchrun --nproc-per-node=N [--nnodes=M --node-rank=K --rdzv-...] -m jobs.run ...``
runs as N*M processes; torchrun tells each one who it is through the environment: ``RANK`` (0 ..
WORLD_SIZE-1, unique over all nodes), ``WORLD_SIZE``, ``LOCAL_RANK`` (the GPU on this node) and
``MASTER_ADDR``/``MASTER_PORT`` (the rendezvous). Without torchrun these are unset: one process,
rank 0 of 1, and every helper here is a no-op.

Rank 0 is "the job" (store checks, MLflow run, commit, result line); the others only help compute.
``SELMA_DIST_TIMEOUT_S`` (default 1800) bounds how long a collective waits for a rank that neither
answers nor exits; a rank that exits (an error) is noticed by torchrun, which stops the others.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

ENV_TIMEOUT = "SELMA_DIST_TIMEOUT_S"
# A gloo group beside NCCL's, for votes on the CPU (any_process); None until the first vote, and
# under gloo, where the default group is on the CPU already.
_cpu_group = None


def world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_distributed() -> bool:
    return world()[1] > 1


def is_main() -> bool:
    """Whether this process is rank 0 (the only one that commits, tracks and reports)."""
    return world()[0] == 0


def _initialized() -> bool:
    if "torch" not in sys.modules:  # nothing joined a group yet; a job that needs no torch loads none
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the joined process group; ``(0, 1)`` when none was joined.

    What work splitting must use: a process that never called ``init`` computes everything itself,
    whatever its environment says.
    """
    import torch.distributed as dist

    if _initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(device: str) -> str:
    """Join the process group when ``WORLD_SIZE`` > 1; the device this process computes on.

    NCCL on CUDA (each process pinned to ``cuda:LOCAL_RANK``), gloo on CPU. Idempotent: a second
    call returns the same device and joins nothing.
    """
    _, world_size, local_rank = world()
    if world_size == 1:
        return device
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not _initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://", timeout=_timeout())
    return device


def _timeout() -> timedelta:
    """How long a collective waits for a process that neither answers nor exits."""
    return timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, "1800")))


def _group_device():
    """Where collective tensors must live: the CUDA device under NCCL, the CPU under gloo."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_gradients(params) -> None:
    """Sum every parameter's gradient over all processes, in place (one flat all-reduce).

    A parameter without a gradient (a process that computed no micro-batch) contributes zeros and
    gets the sum too.
    """
    import torch
    import torch.distributed as dist

    if not _initialized():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).to(_group_device(), torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_reduce_sum(values: list[float]) -> list[float]:
    """Python numbers, each summed over all processes (in float64), in one collective."""
    import torch
    import torch.distributed as dist

    if not _initialized() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_group_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds in every process (one collective): where all must take one path."""
    if not _initialized():
        return flag
    import torch.distributed as dist

    return all_reduce_sum([1.0 if flag else 0.0])[0] == dist.get_world_size()


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds in any process: a vote, one small collective on the CPU.

    Cheap enough for every training step: under NCCL it goes through a gloo group of its own, so it
    neither waits for the GPU's queued work nor reads anything from the device (``all_reduce_sum``
    on an NCCL group would do both). Every process must call it at the same point.
    """
    global _cpu_group
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist

    if _cpu_group is None and dist.get_backend() != "gloo":
        # A collective too (every process is here), bounded as the default group's are.
        _cpu_group = dist.new_group(backend="gloo", timeout=_timeout())
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(vote.item())


def all_gather_object(obj) -> list:
    """Every process's ``obj`` (picklable, small), by rank; ``[obj]`` without a process group."""
    import torch.distributed as dist

    if not _initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# Bytes a collective of assemble_rows moves at once: its buffer on the GPU under NCCL.
ASSEMBLE_CHUNK_BYTES = 256 * 2**20


def assemble_rows(rows: list[int], values, total: int):
    """One CPU tensor of ``total`` rows, each computed by one process: this process computed
    ``values[k]`` as row ``rows[k]`` (``values`` None when it computed none); every row must be
    some process's, and only one's. Without a process group: ``values``, rows ``0 .. total - 1``.

    The rows travel as their bytes (a sum of one process's bytes and every other's zeros, in
    chunks), so every process gets exactly the bits their process computed, in any dtype.
    """
    import torch
    import torch.distributed as dist

    if (0 if values is None else len(values)) != len(rows):
        raise ValueError(f"{len(rows)} rows named, {0 if values is None else len(values)} given")
    if not _initialized():
        if rows != list(range(total)):
            raise ValueError(f"one process must compute every row, 0 .. {total - 1}")
        return values
    # A process that computed no row learns the rows' shape and dtype from one that did.
    described = all_gather_object(
        (sorted(rows), None if values is None else (tuple(values.shape[1:]), str(values.dtype)))
    )
    # Checked in every process alike (all raise or none): a row summed twice would be garbage.
    if sorted(r for named, _ in described for r in named) != list(range(total)):
        raise ValueError(f"the processes' rows are not 0 .. {total - 1}, each computed once")
    shape, dtype = next(d for _, d in described if d is not None)
    full = torch.zeros((total, *shape), dtype=getattr(torch, dtype.removeprefix("torch.")))
    if values is not None:
        full[rows] = values.to("cpu", full.dtype)
    flat = full.view(-1).view(torch.uint8)
    device = _group_device()
    for start in range(0, flat.numel(), ASSEMBLE_CHUNK_BYTES):
        chunk = flat[start : start + ASSEMBLE_CHUNK_BYTES]
        buffer = chunk.to(device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        chunk.copy_(buffer)
        del buffer
    if device.type == "cuda":  # the buffers' cached blocks would count as used memory after this
        torch.cuda.empty_cache()
    return full


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Overwrite every process's tensors with rank ``src``'s, in place."""
    import torch.distributed as dist

    if not _initialized():
        return
    device = _group_device()
    for t in tensors:
        if t.device == device:
            dist.broadcast(t.data, src=src)
        else:
            buf = t.detach().to(device)
            dist.broadcast(buf, src=src)
            t.data.copy_(buf)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (picklable) on every process; ``obj`` itself without a process group."""
    import torch.distributed as dist

    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_group_device())
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if _initialized():
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    """Leave the process group (on success; after a failure the process just exits)."""
    import torch.distributed as dist

    global _cpu_group
    if _initialized():
        dist.destroy_process_group()  # every group, the CPU votes' too
    _cpu_group = None
