"""How a training run uses its processes: all of it in this one (:class:`OneProcess`, the
default), or spread over the ranks of a ``torch.distributed`` process group on a ``dp × ep``
device mesh (:class:`ExpertParallelRanks`, ``sparsemoe lm train --expert-parallel`` and/or
``--data-parallel N`` under ``torchrun``): the experts over "ep", FSDP2 over "dp" and the whole
mesh (:func:`sparsemoe.parallel.parallelize`).

The trainer is written once against :class:`OneProcess`'s methods; the distributed version
overrides them, so the training loop holds no ``if distributed:``. With ``W`` ranks every
rank reads the same batches of ``B`` streams and takes its own ``B/W`` of them
(:meth:`~OneProcess.shard`); each rank's loss is the mean over its streams, so the mean over
the ranks is the loss of the whole batch, as on one process.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh

from .. import parallel
from .._checks import check_int, check_number

T = TypeVar("T")

DEFAULT_TIMEOUT = 600.0
"""Seconds a collective waits for the other ranks (torch's own default is 30 minutes). Long
enough for rank 0 to read a large corpus while the others wait (``root_first``), short enough
that a frozen rank ends the job within minutes. A rank that dies closes its connections, and
the others' next collective fails at once rather than after the timeout. The mesh's groups
take the same timeout (:func:`sparsemoe.parallel.parallelize`)."""


class OneProcess:
    """A run in this process only: every method is the identity or torch's own."""

    rank = 0
    world_size = 1
    device = torch.device("cpu")
    exchange_capacity: int | None = None  # no expert exchange: nothing is dropped

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model to train, on :attr:`device`."""
        return model.to(self.device)

    def root_first(self, load: Callable[[], T]) -> T:
        """``load()``; in a distributed run rank 0 calls it before the others (it may fill a
        cache that they then read)."""
        return load()

    def shard(self, t: Tensor, dim: int = 0) -> Tensor:
        """This process's streams of ``t`` (streams along ``dim``), on :attr:`device`."""
        return t.to(self.device)

    def gather_streams(self, t: Tensor, dim: int) -> Tensor:
        """Every process's streams of ``t`` (streams along ``dim``), in rank order."""
        return t

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the processes."""
        return t

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip the norm of the whole model's gradient (that of the whole batch's loss)."""
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    @property
    def sharded(self) -> bool:
        """Whether the model's state is spread over processes (checkpoints are then
        distributed, :mod:`sparsemoe.parallel.checkpoint`)."""
        return False

    def rng_states(self) -> list[Tensor]:
        """The CPU random state of every process, in rank order (rank 0 gets them all)."""
        return [torch.get_rng_state()]

    def set_rng_states(self, states: list[Tensor]) -> None:
        """Continue the random streams saved by :meth:`rng_states`."""
        torch.set_rng_state(states[0])

    def close(self) -> None:
        """Leave the process group (nothing to leave here)."""


class ExpertParallelRanks(OneProcess):
    """A run over the ranks of the default process group on a ``dp × ep`` device mesh
    (:func:`sparsemoe.parallel.parallelize`): the MoE layers' experts spread over the ep
    groups, FSDP2 over the dp groups for the experts and over every rank for the rest.

    Build it with :meth:`start` in a process that ``torchrun`` launched (or after
    ``torch.distributed.init_process_group``). Every rank draws dropout masks and gating noise
    from a random stream of its own.

    Args:
        device: this rank's device.
        data_parallel: ``dp``, the size of the mesh's "dp" dimension; ``ep = W / dp``.
        replicate: replicate over the mesh instead of sharding (DDP's layout,
            ``parallelize(..., replicate=True)``).
        exchange_capacity: rows each rank sends each expert in the padded exchange (rows
            beyond it dropped and counted), or None for the exact exchange.

    Raises:
        ValueError: ``data_parallel`` does not divide the number of ranks.
    """

    def __init__(self, device: torch.device, data_parallel: int = 1, replicate: bool = False,
                 exchange_capacity: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelRanks needs an initialised default process group; "
                               "use ExpertParallelRanks.start() under torchrun")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        check_int("data_parallel", data_parallel)
        if self.world_size % data_parallel:
            raise ValueError(f"data_parallel ({data_parallel}) must divide the number of ranks "
                             f"({self.world_size}): the mesh is data_parallel × "
                             f"(ranks / data_parallel)")
        self.device = device
        self.replicate, self.exchange_capacity = replicate, exchange_capacity
        self.mesh = init_device_mesh(device.type, (data_parallel, self.world_size // data_parallel),
                                     mesh_dim_names=parallel.MESH_DIMS)

    @classmethod
    def start(cls, timeout: float = DEFAULT_TIMEOUT, data_parallel: int = 1,
              replicate: bool = False, exchange_capacity: int | None = None
              ) -> ExpertParallelRanks:
        """Join the process group that ``torchrun`` describes in the environment: NCCL and
        the GPU ``LOCAL_RANK`` where CUDA is available, gloo on the CPU otherwise.

        Args:
            timeout: seconds a collective (and the start-up rendezvous) may wait for the other
                ranks before it fails, so that a stopped or frozen rank ends the job instead
                of holding the others for torch's default 30 minutes.
            data_parallel, replicate, exchange_capacity: the mesh's "dp" size and layout,
                and the expert exchange (see the class).

        Raises:
            RuntimeError: the environment does not describe a process group.
        """
        check_number("timeout", timeout, low=0, high=math.inf, low_open=True, high_open=True)
        wait = datetime.timedelta(seconds=timeout)
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"expert parallelism runs under torchrun, which sets {', '.join(missing)}: "
                f"torchrun --nproc_per_node N --no-python sparsemoe lm train ... "
                f"--expert-parallel")
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=wait)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo", timeout=wait)
        return cls(device, data_parallel, replicate, exchange_capacity)

    @property
    def sharded(self) -> bool:
        return True

    def prepare(self, model: nn.Module) -> nn.Module:
        # The same weights on every rank (the same seed) before sharding: the run starts from
        # the single-process model.
        model = parallel.parallelize(model.to(self.device), self.mesh,
                                     replicate=self.replicate,
                                     exchange_capacity=self.exchange_capacity)
        self._fork_rng()
        return model

    def _fork_rng(self) -> None:
        torch.manual_seed(parallel.rank_seed())

    def root_first(self, load: Callable[[], T]) -> T:
        if self.rank != 0:
            dist.barrier()  # wait for rank 0's load
        value = load()
        if self.rank == 0:
            dist.barrier()
        return value

    def shard(self, t: Tensor, dim: int = 0) -> Tensor:
        return t.tensor_split(self.world_size, dim)[self.rank].to(self.device)

    def gather_streams(self, t: Tensor, dim: int) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    def sum(self, t: Tensor) -> Tensor:
        t = t.to(self.device, copy=True)
        dist.all_reduce(t)
        return t

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return parallel.clip_grad_norm_(model, max_norm)

    def rng_states(self) -> list[Tensor]:
        states = [None] * self.world_size
        dist.all_gather_object(states, torch.get_rng_state())
        return states

    def set_rng_states(self, states: list[Tensor]) -> None:
        if len(states) == self.world_size:
            torch.set_rng_state(states[self.rank])
        else:  # saved by another number of processes: rank 0's stream, forked per rank
            torch.set_rng_state(states[0])
            self._fork_rng()

    def close(self) -> None:
        dist.destroy_process_group()


ONE_PROCESS = OneProcess()
"""The default: a run in this process only."""
