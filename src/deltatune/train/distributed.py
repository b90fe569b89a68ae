r"""More than one process: DistributedDataParallel (gloo on CPU, nccl on CUDA) and FSDP on CUDA.

Launch any deltatune training with ``torchrun``; :func:`~deltatune.train.fit` notices the
process group (or the ``WORLD_SIZE`` / ``RANK`` variables torchrun sets), joins it, wraps the
model, shards the data and writes files from rank 0 only::

    torchrun --nproc_per_node 2 $(which deltatune) train configs/full.yaml train.batch_size=8

How the data is split. ``train.batch_size`` stays the *per-process* micro-batch, so the global
batch is ``batch_size * world_size`` (times ``grad_accum_steps`` per optimizer step). Every
process draws the same seeded permutation of the epoch, cuts it into global batches and takes
its own contiguous slice of each::

    epoch order  i0 i1 i2 i3 | i4 i5 i6 i7 | ...      (global batch G = B * W, here B=2, W=2)
    rank 0       i0 i1       | i4 i5       | ...
    rank 1             i2 i3 |       i6 i7 | ...

DDP averages the gradients over the processes, so ``mean_r mean_{x in slice r} grad l(x)`` is
the mean over the global batch: the same optimizer step as one process with
``batch_size = B * W`` (exactly, up to float summation order, when every slice has B examples;
the last, incomplete global batch of an epoch is split as evenly as possible, and then each
process's mean counts equally). To reproduce a one-process run with ``batch_size: 16`` on 2
processes, use ``batch_size: 8``.

Evaluation runs the whole validation set on every process (the weights are identical, so are
the metrics: no reduction is needed and early stopping decides the same everywhere); the
logged training loss is averaged over the processes.

FSDP (``train.distributed: fsdp``) shards parameters, gradients and optimizer state over the
processes (PyTorch's ``FullyShardedDataParallel`` with ``use_orig_params=True``, which lets
frozen and trainable parameters share a shard, as adapters need). It is a CUDA feature here:
on CPU it is refused with a clear error (DDP is the CPU path). At the end of training the full
weights are gathered back into the plain model, so saving works as in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from deltatune.data.loader import SeededSampler
from deltatune.errors import ConfigError

DistributedMode = Literal["auto", "none", "ddp", "fsdp"]


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` (0 when unset), so
    that files written before :func:`fit` joins the group are written by rank 0 only too."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a plain one-process run): the process that writes files."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1) if not joined yet.

    The backend is nccl on CUDA and gloo on CPU. Returns whether this call created the group.
    """
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def local_device(device: torch.device) -> torch.device:
    """On CUDA under torchrun each process uses ``cuda:LOCAL_RANK``; CPU stays CPU."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


def resolve_mode(mode: str, device: torch.device) -> Literal["none", "ddp", "fsdp"]:
    """The wrapping to use: ``auto`` means DDP when a multi-process group runs, else none."""
    if mode not in ("auto", "none", "ddp", "fsdp"):
        raise ConfigError(
            f"train.distributed: value {mode!r} is not one of 'auto', 'none', 'ddp', 'fsdp'"
        )
    running = is_distributed()
    if mode == "none":
        return "none"
    if mode == "auto":
        return "ddp" if running else "none"
    if not running:
        raise ConfigError(
            f"train.distributed: '{mode}' needs more than one process; launch with "
            "`torchrun --nproc_per_node N ...` (or use train.distributed=auto)"
        )
    if mode == "fsdp" and device.type != "cuda":
        raise ConfigError(
            f"train.distributed: 'fsdp' is implemented for CUDA devices only, this run is on "
            f"{device.type}; use train.distributed=ddp (gloo) on CPU"
        )
    return "ddp" if mode == "ddp" else "fsdp"


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Wrap for training: DDP (gradients averaged) or FSDP (everything sharded); or as is."""
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not any(p.requires_grad for p in model.parameters()):
            return model  # nothing to synchronise (e.g. a closed-form method)
        ids = [device.index] if device.type == "cuda" and device.index is not None else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, use_orig_params=True, device_id=device)


def unwrap_fsdp(wrapped: nn.Module, model: nn.Module) -> None:
    """Gather an FSDP-trained model's full weights back into ``model`` as plain parameters.

    FSDP keeps each parameter as a view into a sharded flat buffer; inside
    ``summon_full_params`` they are whole, and cloning them into fresh parameters leaves
    ``model`` a plain module that saves, merges and evaluates as in one process.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=False):
        full = {
            name: (param.detach().clone(), param.requires_grad)
            for name, param in model.named_parameters()
        }
    for name, (tensor, requires_grad) in full.items():
        owner_name, _, local = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, local, nn.Parameter(tensor, requires_grad=requires_grad))


def no_sync(wrapped: nn.Module, skip: bool) -> AbstractContextManager[Any]:
    """DDP/FSDP ``no_sync`` for micro-batches before the last of an accumulation window."""
    fn = getattr(wrapped, "no_sync", None)
    return fn() if skip and callable(fn) else nullcontext()


def mean_over_processes(value: float, device: torch.device) -> float:
    """The mean of a float over all processes (the value itself in one process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class ShardedSampler(SeededSampler):
    """This process's share of every global batch of the seeded epoch order (see module doc).

    ``batch_size`` is the per-process batch; ``start`` in :meth:`set_epoch` counts this
    process's examples (as :func:`fit` computes it from the batches already done), so a
    resumed run continues each process where it stopped.
    """

    def __init__(
        self, num_examples: int, *, seed: int, batch_size: int, rank: int, world_size: int
    ) -> None:
        super().__init__(num_examples, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def _own(self) -> list[int]:
        order = self.order(self.epoch)
        global_batch = self.batch_size * self.world_size
        mine: list[int] = []
        for begin in range(0, len(order), global_batch):
            chunk = order[begin : begin + global_batch]
            if len(chunk) == global_batch:
                lo = self.rank * self.batch_size
                mine.extend(chunk[lo : lo + self.batch_size])
                continue
            # The last, short global batch: near-equal contiguous parts; a process left with
            # nothing (fewer examples than processes) repeats one example so that every
            # process runs the same number of steps (a collective would hang otherwise).
            parts = [p.tolist() for p in torch.tensor(chunk).tensor_split(self.world_size)]
            mine.extend(parts[self.rank] or [chunk[self.rank % len(chunk)]])
        return mine

    def __iter__(self) -> Iterator[int]:
        return iter(self._own()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._own()) - self.start)

    def batches_per_epoch(self) -> int:
        global_batch = self.batch_size * self.world_size
        return -(-self.num_examples // global_batch)


def sharded_loader(
    dataset: Any, batch_size: int, seed: int, collate: Any = None
) -> torch.utils.data.DataLoader[Any]:
    """A loader over this process's share of each global batch (:class:`ShardedSampler`)."""
    sampler = ShardedSampler(
        len(dataset), seed=seed, batch_size=batch_size, rank=rank(), world_size=world_size()
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=0,
        drop_last=False,
        generator=generator,
    )


def shutdown() -> None:
    """Leave the process group (if any) once all processes are done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
