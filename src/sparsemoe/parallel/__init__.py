"""Expert parallelism over ``torch.distributed``: the experts are spread over the ranks of a
process group and the tokens travel to them (Shazeer et al. 2017, §3.1–3.2).

With world size ``W`` each rank holds ``n/W`` of the ``n`` experts (rank ``r`` holds experts
``r·n/W … (r+1)·n/W − 1``). Everything else (the gate, the layers around the MoE) is
data-parallel: every rank holds a copy and routes its own tokens. One forward of a layer:

1. the rank routes its ``T`` tokens and sorts its ``N`` (token, expert) pairs by expert
   (:func:`~sparsemoe.dispatch.sort_by_expert`); the sorted rows are then also grouped by the
   rank that holds their expert;
2. the ranks exchange their per-expert counts (``W × n/W`` integers), then the rows
   (``all_to_all_single`` with uneven splits);
3. each rank sorts the rows it received by local expert and runs its bank through the same
   grouped matmul as one process: every expert's batch holds the rows of all ``W`` ranks (the
   paper's remedy for the shrinking batch);
4. the outputs go back by the reverse exchange and are combined by the gates, as on one process.

The exchanges are torch's functional collectives (``all_to_all_single_autograd``), whose
backward is the reverse exchange, so gradients travel back the same way; ``torch.compile``
traces them into the layer's graph. Parallelism is chosen once, at construction:
:class:`ExpertParallel` is an expert bank like any other, and ``MoELayer.forward`` runs
unchanged on it.

- :func:`expert_parallel` shards the banks of a model built for one process (the usual way:
  build the same model on every rank with the same seed, then shard it);
- :func:`~sparsemoe.parallel.parallelize` trains on a ``("dp", "ep")`` device mesh: experts
  over "ep", FSDP2 (sharded, or ``replicate=True``) over "dp", which averages the
  data-parallel gradients (:mod:`sparsemoe.parallel.mesh`);
- :func:`full_state_dict` / :func:`load_full_state_dict` (and the optimizer versions) save and
  load the single-process layout, so a checkpoint written by ``W`` ranks loads into ``W'``
  ranks or into one process, and back.

Every rank of the group must run each forward and backward of an expert-parallel layer (they
meet in the exchanges), in the same mode (training or evaluation, with or without gradients).

Index letters: ``W`` ranks, ``n`` experts, ``n_l = n/W`` experts per rank, ``N`` rows this
rank sends, ``M`` rows this rank's experts compute, ``d`` width.
"""

from .checkpoint import (
    consolidate,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    sharded_checkpoint_extra,
    sharded_checkpoint_path,
)
from .exchange import (
    ExchangeStats,
    ExpertParallel,
    ProcessGroup,
    all_to_all,
    local_share,
    rank_seed,
    rank_seeded,
    shard_experts,
)
from .mesh import MESH_DIMS, clip_grad_norm_, parallelize
from .model import (
    exchange_stats,
    expert_parallel,
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)

__all__ = [
    "MESH_DIMS",
    "ExchangeStats",
    "ExpertParallel",
    "ProcessGroup",
    "all_to_all",
    "clip_grad_norm_",
    "consolidate",
    "exchange_stats",
    "expert_parallel",
    "full_optimizer_state_dict",
    "full_state_dict",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "load_sharded_checkpoint",
    "local_share",
    "parallelize",
    "rank_seed",
    "rank_seeded",
    "save_sharded_checkpoint",
    "shard_experts",
    "sharded_checkpoint_extra",
    "sharded_checkpoint_path",
]
