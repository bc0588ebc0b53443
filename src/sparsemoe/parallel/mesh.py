"""Expert and sharded (or replicated) data parallelism on one ``DeviceMesh`` with dimensions
``("dp", "ep")``: :func:`parallelize` (FSDP2 over "dp", experts over "ep"),
:func:`clip_grad_norm_` over the whole model, and distributed checkpoints
(``torch.distributed.checkpoint``) that load into any mesh shape or into one process.

Layout on a ``dp × ep`` mesh of ``W = dp·ep`` ranks, rank ``(i, j)`` (``i`` along "dp", ``j``
along "ep"), ``n`` experts:

- expert bank: the ep group ``{(i, ·)}`` spreads the ``n`` experts, ``n/ep`` per rank
  (:class:`~sparsemoe.parallel.ExpertParallel`, tokens by all-to-all inside the group); FSDP2
  shards each rank's ``n/ep`` experts over the dp group ``{(·, j)}``, so rank ``(i, j)`` stores
  experts ``j·n/ep + i·n/W … j·n/ep + (i+1)·n/W − 1`` and gathers its ``n/ep`` for the forward;
- every other parameter: FSDP2 over all ``W`` ranks (the flattened mesh), ``1/W`` of each;
- every rank reads its own tokens: the loss of a step is the mean of the ``W`` ranks' losses.

Gradients: a non-expert parameter's gradient is averaged over the ``W`` ranks by FSDP's
reduce-scatter. An expert's gradient on rank ``(i, j)`` already sums the contributions of the
``ep`` ranks of its group (the reverse exchange brought them); the reduce-scatter over "dp"
sums the ``dp`` groups and divides by ``W`` (not ``dp``): ``(1/W) Σ_r ∂L_r/∂θ``, as on one
process with all tokens.

With ``replicate=True`` the same groups replicate instead of shard (the data parallelism of
DDP): FSDP2's ``replicate`` (``torch.distributed._composable.replicate_with_fsdp``) in place of
``fully_shard``, each rank holding its ep group's ``n/ep`` experts and every other parameter
whole, as ``Replicate`` DTensors; the reduce-scatters become all-reduces with the same sums
and divisors.

Above :mod:`sparsemoe.parallel.model`; torch's FSDP2, DTensor and DCP do the work.
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._composable.replicate_with_fsdp import replicate as replicate_module
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from .._checks import check_bool, check_number
from ..module import MoEModule
from .model import _expert_banks, _same_group, expert_parallel

MESH_DIMS = ("dp", "ep")

_MESH_ATTR = "_sparsemoe_mesh"


def _check_mesh(mesh: DeviceMesh) -> None:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    if tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(f"mesh must have the dimensions {MESH_DIMS} (init_device_mesh(device, "
                         f"(dp, ep), mesh_dim_names=('dp', 'ep'))), got "
                         f"{mesh.mesh_dim_names}")


class _ModelMesh:
    """What :func:`parallelize` leaves on the model: the mesh, and the mesh and placements
    that describe each rank's expert rows as a part of the stacked banks in checkpoints.

    Sharded: a 1-D mesh that orders the ranks as their shards lie along the banks (ep-major:
    rank ``(i, j)`` at position ``j·dp + i``), ``Shard(0)``. Replicated: the mesh itself,
    ``(Replicate(), Shard(0))`` (the dp ranks hold copies of their ep group's rows)."""

    def __init__(self, mesh: DeviceMesh, replicate: bool) -> None:
        self.mesh = mesh
        self.experts: DeviceMesh
        self.expert_placements: tuple[Placement, ...]
        if replicate:
            self.experts, self.expert_placements = mesh, (Replicate(), Shard(0))
        else:
            # layout only (no process group): checkpoints place the shards by it, DCP
            # communicates over the default group
            self.experts = DeviceMesh(mesh.device_type, mesh.mesh.t().reshape(-1),
                                      mesh_dim_names=("ep_dp",), _init_backend=False)
            self.expert_placements = (Shard(0),)


def _backend(group: dist.ProcessGroup, device_type: str):
    return group._get_backend(torch.device(device_type))


def parallelize(model: nn.Module, mesh: DeviceMesh, timeout: float | None = None,
                replicate: bool = False, exchange_capacity: int | None = None) -> nn.Module:
    """Spread ``model`` over a ``dp × ep`` ``DeviceMesh``, in place: every MoE layer's experts
    over "ep" (:func:`~sparsemoe.parallel.expert_parallel` on the ep group), then FSDP2
    (``fully_shard``) over "dp" for each expert bank and over the whole mesh for the rest;
    with ``replicate``, FSDP2's ``replicate`` over the same groups (DDP's layout: copies and
    all-reduced gradients, no sharding).

    Build the same single-process model on every rank (the same seed) and call this: the
    distributed model starts from the single-process weights. Train with an ordinary loop;
    clip with :func:`clip_grad_norm_` (the norm over every expert once). Every rank reads its
    own tokens; the ``W`` ranks' losses average to the loss of the whole batch.

    A rank that dies or stops makes the others' next collective fail: at once where its
    connections close (a dead process), after ``timeout`` where it stays silent (a frozen
    one). ``init_device_mesh`` gives the mesh's groups torch's default timeout (30 minutes)
    whatever ``init_process_group`` was given, so the groups' timeout is set here.

    Args:
        model: a model containing sparsemoe MoE layers with ``FeedForwardExperts`` banks.
        mesh: ``init_device_mesh(device, (dp, ep), mesh_dim_names=("dp", "ep"))``.
        timeout: seconds a collective of the mesh's groups (the expert exchange, FSDP's
            all-gathers and reduce-scatters, the norm) waits for the other ranks before it
            raises; None: the default process group's (``init_process_group(timeout=...)``).
        replicate: replicate over "dp" (the experts) and the whole mesh (the rest) instead of
            sharding: more memory per rank, no all-gather in the forward and backward.
        exchange_capacity: rows each rank sends to each expert in the padded exchange (no
            host read; :class:`~sparsemoe.parallel.ExpertParallel`), or None for the exact one.

    Returns:
        ``model`` (now an FSDP2 module).

    Raises:
        TypeError: ``mesh`` is not a DeviceMesh, or a layer's bank is not FeedForwardExperts.
        ValueError: the mesh's dimensions are not ``("dp", "ep")``, the model has no MoE layer,
            a layer's number of experts is not divisible by ``dp·ep``, a layer's experts are
            already spread over another group, or ``timeout`` is not positive.
        TypeError: ``replicate`` is not a bool, or ``exchange_capacity`` not an int.
        ValueError: ``exchange_capacity`` is below 1.
    """
    _check_mesh(mesh)
    check_bool("replicate", replicate)
    spread = replicate_module if replicate else fully_shard
    if timeout is None:
        wait = _backend(dist.group.WORLD, mesh.device_type).options._timeout
    else:
        check_number("timeout", timeout, low=0, high=math.inf, low_open=True, high_open=True)
        wait = timedelta(seconds=timeout)
    world = mesh.size()
    for name, layer in model.named_modules():
        if isinstance(layer, MoEModule) and layer.num_experts % world:
            raise ValueError(f"{name or 'model'}: num_experts ({layer.num_experts}) must be "
                             f"divisible by dp × ep ({mesh.size(0)} × {mesh.size(1)} = {world}):"
                             f" every rank stores num_experts / (dp × ep) experts")
    ep_group = mesh.get_group("ep")
    expert_parallel(model, ep_group, exchange_capacity)
    for name, bank in _expert_banks(model).items():
        if not _same_group(bank.group, ep_group):
            raise ValueError(f"{name}: the layer's experts are spread over another process group "
                             f"than the mesh's 'ep' dimension; build the layer for one process "
                             f"(no process_group) and let parallelize spread it")
        spread(bank.local, mesh=mesh["dp"])
        bank.local.set_gradient_divide_factor(float(world))
        # Sharded: a sum, then the division; the pre-multiplied sum that a divisor other than
        # the group's size needs is NCCL's only (gloo has none). Not where FSDP2 has no
        # reduce-scatter to run (one dp rank, or replicated): torch 2.13 divides the local
        # gradient there and would then divide again after the sum.
        bank.local.set_force_sum_reduction_for_comms(mesh.size(0) > 1 and not replicate)
    everyone = mesh._flatten("dp_ep")
    spread(model, mesh=everyone)
    for group in (mesh.get_group("dp"), mesh.get_group("ep"), everyone.get_group()):
        _backend(group, mesh.device_type)._set_default_timeout(wait)
    setattr(model, _MESH_ATTR, _ModelMesh(mesh, replicate))
    return model


def model_mesh(model: nn.Module) -> _ModelMesh | None:
    """The mesh :func:`parallelize` spread ``model`` over (None: a model on one process)."""
    return getattr(model, _MESH_ATTR, None)


def _norm(grads: list[Tensor], norm_type: float, device_type: str) -> Tensor:
    if not grads:  # still a tensor for the all-reduce, on the backend's device
        return torch.zeros((), device=device_type)
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    return total.full_tensor() if isinstance(total, DTensor) else total


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale every gradient of ``model`` by ``min(1, max_norm / (‖g‖ + 1e-6))``, with ``‖g‖``
    the ``norm_type``-norm of the whole model's gradient as on one process:
    ``torch.nn.utils.clip_grad_norm_`` on a :func:`parallelize`-d model.

    ``torch.nn.utils.get_total_norm`` reduces each group of DTensor gradients over its mesh:
    the non-expert ones over all ranks, each rank's experts over its dp group. Expert
    gradients differ between the ep ranks (each holds other experts), so their norms are
    combined over the ep group, every expert counted once:
    ``‖g‖ = (‖g_rest‖^p + Σ_j ‖g_experts,j‖^p)^(1/p)``. ``torch.nn.utils.clip_grads_with_norm_``
    then scales each group. On a model without a mesh it is ``torch.nn.utils.clip_grad_norm_``.

    Raises:
        ValueError: ``norm_type`` is not a positive finite number (on a mesh).

    Returns:
        ``‖g‖`` (a scalar tensor, the same on every rank).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    layout = model_mesh(model)
    if layout is None:
        return nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    check_number("norm_type", norm_type, low=0, high=math.inf, low_open=True, high_open=True)
    experts = {id(p) for b in _expert_banks(model).values() for p in b.parameters()}
    groups = ([p for p in params if id(p) not in experts], [p for p in params if id(p) in experts])
    rest = _norm([p.grad for p in groups[0]], norm_type, layout.mesh.device_type)
    own = _norm([p.grad for p in groups[1]], norm_type, layout.mesh.device_type).to(rest.dtype)
    own = own.pow(norm_type)
    dist.all_reduce(own, group=layout.mesh.get_group("ep"))
    total = (rest.pow(norm_type) + own).pow(1.0 / norm_type)
    for group_params in groups:  # one call per mesh: DTensor ops take one mesh
        nn.utils.clip_grads_with_norm_(group_params, max_norm, total)
    return total
