"""Global-batch balancing and the bias update on the ranks of a gloo group, spawned by
``test_balancing.py``: each rank holds a slice of one global batch."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from sparsemoe import FeedForwardExperts, MoE, MoELayer, aux_loss, balancing, routers

D = 6
COUNTS = (7, 3, 5, 9)  # tokens of the ranks' slices (the first W are used)


def global_batch(world: int) -> torch.Tensor:
    return torch.randn(sum(COUNTS[:world]), D, generator=torch.Generator().manual_seed(11))


def models() -> dict[str, torch.nn.Module]:
    """The same weights in every process."""
    torch.manual_seed(0)
    top_k = MoELayer(routers.TopKRouter(D, 6, 2, w_importance=0.1, w_switch=0.1, w_z=0.01),
                     FeedForwardExperts(6, D, 4))
    noisy = MoE(D, 6, k=2, hidden=4, noisy_gating=False, w_importance=0.3, w_load=0.3)
    deepseek = MoELayer(routers.DeepSeekV3Router(D, 6, 2, bias_update_speed=0.05),
                        FeedForwardExperts(6, D, 4))
    for m in (top_k, noisy, deepseek):
        with torch.no_grad():
            m.router.w_gate.normal_()
    return {"top_k": top_k, "noisy": noisy, "deepseek": deepseek}


def aux_and_grads(model: torch.nn.Module, x: torch.Tensor, group=None) -> tuple[float, list]:
    """The global-batch aux loss of ``x`` (this rank's slice) and the router gradients,
    averaged over the group's ranks as data parallelism does."""
    model.zero_grad()
    with balancing.GlobalBatchBalancing(model, group):
        model(x)
        aux = aux_loss(model)
    aux.backward()
    grads = []
    for p in model.router.parameters():
        g = p.grad.clone()
        if group is not None:
            dist.all_reduce(g, group=group)
            g /= dist.get_world_size(group)
        grads.append(g.reshape(-1).tolist())
    return float(aux.detach()), grads


def worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        x = global_batch(world)
        start = sum(COUNTS[:rank])
        mine = x[start:start + COUNTS[rank]]
        out = {}
        for name, model in models().items():
            if name == "deepseek":
                model.train()
                model(mine)
                load = balancing.update_expert_biases(model, dist.group.WORLD)[0]
                out[name] = {"load": load.tolist(), "bias": model.router.expert_bias.tolist()}
            else:
                aux, grads = aux_and_grads(model, mine, dist.group.WORLD)
                out[name] = {"aux": aux, "grads": grads}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()
