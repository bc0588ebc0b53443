"""Distributed checkpoints of a :func:`~sparsemoe.parallel.parallelize`-d model and its
optimizer with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards, no
gather; a checkpoint loads into any mesh shape, or into one process, and back.

The checkpoint holds the single-process layout: the keys are those of the model on one
process (``layer.experts.w1`` ``[n, d, h]``, not a rank's ``layer.experts.local.w1``) and each
tensor is described by its global shape, so DCP reshards on load. FSDP2's parameters and
optimizer state are already DTensors of their global shape; an expert bank's shard is
rewritten as a DTensor ``Shard(0)`` of the whole bank over the ranks in ep-major order (rank
``(i, j)`` of a ``dp × ep`` mesh holds rows ``(j·dp + i)·n/W …`` of the stacked bank, see
:mod:`sparsemoe.parallel.mesh`); replicated (``parallelize(..., replicate=True)``), as a
DTensor ``(Replicate(), Shard(0))`` on the mesh (rank ``(i, j)`` holds rows ``j·n/ep …``). The
optimizer state of an expert bank (Adam's moments, FactoredAdam's per-expert factors) has the
experts along dimension 0 too and is described the same way.

A save writes a new folder beside the checkpoint and then switches: ``path.new`` is written
by every rank, then rank 0 renames ``path`` to ``path.old``, ``path.new`` to ``path`` and
removes ``path.old``. A crash at any point leaves a complete checkpoint: ``path`` or, between
the renames, ``path.old``, which :func:`load_sharded_checkpoint` falls back on. The plain
values saved beside the tensors (``extra.pt``) have their SHA-256 beside them
(``extra.pt.sha256``, :mod:`sparsemoe._checksum`), checked whenever they are read.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from .._checksum import checksum_path, checksum_text, read_verified
from .exchange import ExpertParallel
from .mesh import model_mesh
from .model import _bank_keys

EXTRA = "extra.pt"
"""The file, inside a checkpoint folder, of the plain values saved beside the tensors."""


def _is_root(model: nn.Module) -> bool:
    return model_mesh(model) is None or dist.get_rank() == 0


def _barrier(model: nn.Module) -> None:
    if model_mesh(model) is not None:
        dist.barrier()


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _global(t: Tensor, bank: ExpertParallel, model: nn.Module) -> Tensor:
    """This rank's rows of an expert tensor as a DTensor of the whole stacked bank."""
    local = _local(t)
    shape = torch.Size((bank.num_experts, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    layout = model_mesh(model)
    return DTensor.from_local(local, layout.experts, layout.expert_placements, run_check=False,
                              shape=shape, stride=stride)


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """``(live, in the checkpoint's layout)``: torch's state dicts of ``model`` (and
    ``optimizer``) and the same tensors under single-process keys, the expert shards as
    DTensors of the whole banks (sharing memory with the live ones)."""
    optimizers = () if optimizer is None else (optimizer,)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    live = {"model": model_sd}
    if optimizer is not None:
        live["optimizer"] = optim_sd
    experts = _bank_keys(model)[0]
    if experts and model_mesh(model) is None:
        raise ValueError(f"model ({type(model).__name__}) has expert-parallel layers on a process "
                         f"group without a device mesh; distributed checkpoints need "
                         f"parallelize(model, mesh) (or full_state_dict for this layout)")
    saved_model = {}
    for key, value in model_sd.items():
        if key in experts:
            bank, key = experts[key]
            value = _global(value, bank, model)
        saved_model[key] = value
    saved = {"model": saved_model}
    if optimizer is not None:
        state = {}
        for key, entry in optim_sd["state"].items():
            if key in experts:
                bank, key = experts[key]
                entry = {name: _global(v, bank, model)
                         if isinstance(v, Tensor) and v.dim() > 0 else v
                         for name, v in entry.items()}
            state[key] = entry
        groups = [{**g, "params": [experts[k][1] if k in experts else k for k in g["params"]]}
                  for g in optim_sd["param_groups"]]
        saved["optimizer"] = {"state": state, "param_groups": groups}
    return live, saved


def _copy_values(live: dict, saved: dict, experts: dict) -> None:
    """Put the values of the optimizer state ``saved`` (checkpoint layout) that are not
    tensors (hyperparameters, step counts kept as numbers) into ``live`` (torch's layout)."""
    for group, loaded in zip(live["param_groups"], saved["param_groups"], strict=True):
        group.update({k: v for k, v in loaded.items() if k != "params"})
    for key, entry in live["state"].items():
        loaded = saved["state"][experts[key][1] if key in experts else key]
        entry.update({k: v for k, v in loaded.items() if not isinstance(v, Tensor)})


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".new"), path.with_name(path.name + ".old")


def save_sharded_checkpoint(path: str | Path, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None,
                            extra: dict | None = None) -> Path:
    """Save ``model`` (and ``optimizer``) into the folder ``path`` with DCP, every rank its
    own shards, then switch atomically (see the module docstring). Every rank must call it.

    Args:
        path: the checkpoint folder (replaced).
        model: a :func:`~sparsemoe.parallel.parallelize`-d model, or a model on one process.
        optimizer: its optimizer (state shaped like the parameters, or scalars: Adam, AdamW,
            SGD with momentum; or :class:`~sparsemoe.optim.FactoredAdam`, whose factors are
            DTensors on the mesh and have an expert bank's experts along dimension 0).
        extra: plain values (tensors, numbers, strings, lists, dicts) of rank 0, saved with
            ``torch.save`` in ``path/extra.pt``.

    Returns:
        ``path``.

    Raises:
        ValueError: ``model`` has expert-parallel layers but no mesh (``expert_parallel`` on a
            process group).
    """
    path = Path(path)
    new, old = _siblings(path)
    _, saved = _states(model, optimizer)
    if _is_root(model):
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
    _barrier(model)
    dcp.save(saved, checkpoint_id=new, no_dist=model_mesh(model) is None)
    if _is_root(model):
        if extra is not None:
            buffer = io.BytesIO()
            torch.save(extra, buffer)
            checksum_path(new / EXTRA).write_text(checksum_text(new / EXTRA, buffer.getvalue()))
            (new / EXTRA).write_bytes(buffer.getvalue())
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier(model)
    return path


def sharded_checkpoint_path(path: str | Path) -> Path | None:
    """The complete checkpoint that ``path`` stands for: ``path``, or ``path.old`` where a
    save stopped between its two renames; None where there is neither."""
    path = Path(path)
    old = _siblings(path)[1]
    for candidate in (path, old):
        if (candidate / ".metadata").is_file():
            return candidate
    return None


def _complete(path: str | Path) -> Path:
    """:func:`sharded_checkpoint_path`, or FileNotFoundError naming ``path``."""
    found = sharded_checkpoint_path(path)
    if found is None:
        raise FileNotFoundError(f"no distributed checkpoint at {path} (no {path}/.metadata)")
    return found


def _extra(found: Path) -> dict:
    """The ``extra`` values saved in the complete checkpoint ``found`` (empty without them),
    verified against their checksum.

    Raises:
        RuntimeError: ``extra.pt`` has no checksum file, or does not match it.
    """
    extra = found / EXTRA
    if not extra.is_file():
        return {}
    return torch.load(io.BytesIO(read_verified(extra, RuntimeError)), weights_only=True)


def load_sharded_checkpoint(path: str | Path, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint of :func:`save_sharded_checkpoint`, written on any mesh shape or on
    one process, into ``model`` (and ``optimizer``) on this mesh shape or on one process.
    Every rank must call it; each reads the pieces of its own shards.

    Returns:
        the ``extra`` values saved with it (empty without them).

    Raises:
        FileNotFoundError: ``path`` holds no complete checkpoint.
        RuntimeError: its ``extra.pt`` does not match its checksum (or has none).
    """
    found = _complete(path)
    live, saved = _states(model, optimizer)
    dcp.load(saved, checkpoint_id=found, no_dist=model_mesh(model) is None)
    # DCP loaded the tensors in place (the expert DTensors share memory with the live shards)
    # and replaced the other values in the checkpoint layout's dictionaries: copy those back
    if optimizer is not None:
        _copy_values(live["optimizer"], saved["optimizer"], _bank_keys(model)[0])
    set_state_dict(model, () if optimizer is None else (optimizer,),
                   model_state_dict=live["model"], optim_state_dict=live.get("optimizer", {}))
    return _extra(found)


def sharded_checkpoint_extra(path: str | Path) -> dict:
    """The ``extra`` values of the checkpoint that ``path`` stands for (empty without them),
    read without loading any shard.

    Raises:
        FileNotFoundError: ``path`` holds no complete checkpoint.
        RuntimeError: its ``extra.pt`` does not match its checksum (or has none).
    """
    return _extra(_complete(path))


def consolidate(path: str | Path, file: str | Path) -> Path:
    """Write the checkpoint folder ``path`` as one ``torch.save`` file: ``{"model":
    single-process state dict, "optimizer": {"state": {key: ...}, "param_groups": ...},
    **extra}``, for users who want one ``.pt`` (read on one process, no process group).

    Returns:
        ``file``.
    """
    found = _complete(path)
    file = Path(file)
    dcp_to_torch_save(found, file)
    extra = _extra(found)
    if extra:
        whole = torch.load(file, weights_only=True)
        whole.update(extra)
        torch.save(whole, file)
    return file
