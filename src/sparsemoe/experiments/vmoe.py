"""V-MoE's inference-capacity experiment in miniature (Riquelme et al. 2021, §4 and Figure 6):
train a small Vision MoE on digits, then classify the test set with every MoE layer's capacity
ratio lowered from 1.25 to 0.1, with Batch Prioritized Routing (tokens ordered by their largest
routing weight before the capacity is filled) and without it (tokens in order).

Without BPR, the tokens that come late in the batch lose their experts first, whatever they
carry; with BPR, the tokens the router is least sure of are dropped first. The paper's claim:
with BPR the accuracy degrades gracefully as the capacity shrinks, without it it collapses.

``run`` trains one model per data set and seed (AdamW, cosine schedule, the capacity ratio
``capacity_factor`` in training with BPR) on the training digits less a validation split (the
last ``valid_fraction`` of them after a fixed shuffle, the same for every seed, used to choose
the recipe), evaluates the grid of inference ratios in both orders on the held-out test digits,
and writes ``vmoe.json``, ``vmoe.md`` (mean ± std over seeds) and ``vmoe_capacity.png``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_int, check_number
from ..data.digits import load_digit_set
from ..models.vit import VisionMoE, digits_config
from ..module import aux_loss
from . import runs
from .lm import cosine_factor

DATA_SETS = ("mnist5k", "digits8")  # the digit sets of sparsemoe.data that need no folder
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.25)
POLICIES = {"BPR": "priority", "no BPR": "position"}


@dataclass
class VMoEConfig:
    """Training and evaluation of the V-MoE. The ``vmoe run`` flags are built from these fields
    and their help texts (``metadata["help"]``)."""

    epochs: int = field(default=80, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "images per batch"})
    valid_fraction: float = field(default=0.1, metadata={
        "help": "fraction of the training digits held out for validation (choosing the recipe)"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW's weight decay"})
    warmup_fraction: float = field(default=0.05, metadata={
        "help": "linear warm-up, as a fraction of the training steps"})
    capacity_factor: float = field(default=1.05, metadata={
        "help": "the capacity ratio in training (paper: 1.05)"})
    eval_batch: int = field(default=500, metadata={
        "help": "images per capacity group at inference"})
    d_model: int = field(default=64, metadata={"help": "model width"})
    ffn_hidden: int = field(default=128, metadata={"help": "dense FFN and expert width"})
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer"})
    k: int = field(default=2, metadata={"help": "experts per token"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch", "d_model", "ffn_hidden",
                     "num_experts", "k"):
            check_int(name, getattr(self, name))
        check_number("lr", self.lr, low=0, high=math.inf, low_open=True, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0, high=math.inf, high_open=True)
        check_number("warmup_fraction", self.warmup_fraction, low=0, high=1)
        check_number("valid_fraction", self.valid_fraction, low=0, high=1, high_open=True)
        check_number("capacity_factor", self.capacity_factor, low=0, high=math.inf,
                     low_open=True, high_open=True)
        if self.k > self.num_experts:
            raise ValueError(f"k ({self.k}) must be at most num_experts ({self.num_experts})")


def _tensors(images: np.ndarray, labels: np.ndarray, pixel_max: int) -> tuple[Tensor, Tensor]:
    return (torch.as_tensor(images, dtype=torch.float32) / pixel_max,
            torch.as_tensor(labels, dtype=torch.long))


def validation_split(images: Tensor, labels: Tensor, fraction: float
                     ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``(train, valid)``: the last ``fraction`` of the images after a fixed shuffle (seed 0,
    whatever the training seed) is the validation split; each part is ``(images, labels)``."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    cut = len(images) - round(fraction * len(images))
    keep, held = order[:cut], order[cut:]
    return (images[keep], labels[keep]), (images[held], labels[held])


def train(cfg: VMoEConfig, images: Tensor, labels: Tensor, seed: int,
          progress: bool = True) -> VisionMoE:
    """A :class:`VisionMoE` trained on ``images [N, H, W]`` (values in [0, 1]) with
    cross-entropy plus the MoE losses, AdamW and a warm-up + cosine schedule."""
    torch.manual_seed(seed)
    model = VisionMoE(digits_config(images.shape[-1], capacity_factor=cfg.capacity_factor,
                                    d_model=cfg.d_model, ffn_hidden=cfg.ffn_hidden,
                                    num_experts=cfg.num_experts, k=cfg.k))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(cfg.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, warmup, total,
                                                                           floor=0.0))
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=total, desc=f"V-MoE seed {seed}", unit="step", disable=not progress,
               dynamic_ncols=True)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            (loss + aux_loss(model)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: VisionMoE, images: Tensor, labels: Tensor, batch: int,
             ratio: float | None = None, policy: str | None = None) -> float:
    """Test accuracy with every MoE layer at capacity ratio ``ratio`` and drop ``policy``
    (None, None: dropless), over batches of ``batch`` images (one capacity group each)."""
    saved = [layer.capacity for layer in model.moe_layers()]
    if ratio is None:
        for layer in model.moe_layers():
            layer.capacity = None
    else:
        model.set_capacity(ratio, policy)
    try:
        correct = sum(int((model(images[i: i + batch]).argmax(1) == labels[i: i + batch]).sum())
                      for i in range(0, len(images), batch))
    finally:
        for layer, cap in zip(model.moe_layers(), saved, strict=True):
            layer.capacity = cap
    return correct / len(images)


def capacity_curve(model: VisionMoE, images: Tensor, labels: Tensor, batch: int,
                   ratios: tuple[float, ...] = RATIOS) -> dict:
    """``{"dropless": acc, "BPR": [acc per ratio], "no BPR": [...]}``."""
    curve = {"dropless": accuracy(model, images, labels, batch)}
    for name, policy in POLICIES.items():
        curve[name] = [accuracy(model, images, labels, batch, r, policy) for r in ratios]
    return curve


def run(out: str | Path, data: tuple[str, ...] = ("mnist5k", "digits8"), seeds: int = 3,
        cfg: VMoEConfig | None = None, progress: bool = True) -> dict:
    """Train and evaluate every data set × seed; write ``vmoe.json``, ``vmoe.md`` and
    ``vmoe_capacity.png`` to ``out``; return the results."""
    cfg = cfg or VMoEConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": asdict(cfg), "ratios": list(RATIOS), "data": {}}
    for name in data:
        split = load_digit_set(name)
        (train_x, train_y), (valid_x, valid_y) = validation_split(
            *_tensors(split.train_images, split.train_labels, split.pixel_max),
            cfg.valid_fraction)
        test_x, test_y = _tensors(split.test_images, split.test_labels, split.pixel_max)
        seed_runs = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            model = train(cfg, train_x, train_y, seed, progress)
            seconds = time.perf_counter() - t0
            valid = accuracy(model, valid_x, valid_y, cfg.eval_batch) if len(valid_x) else None
            curve = capacity_curve(model, test_x, test_y, cfg.eval_batch)
            seed_runs.append({"seed": seed, "train_seconds": seconds, "valid": valid, **curve})
        results["data"][name] = {"train": len(train_x), "valid": len(valid_x),
                                 "test": len(test_x), "runs": seed_runs}
    runs.write_json(out / "vmoe.json", results)
    table = format_table(results)
    runs.write_text(out / "vmoe.md", "# V-MoE: test accuracy against the inference capacity "
                                     "ratio\n\n" + table + "\n")
    print(table, flush=True)
    plot(results, out / "vmoe_capacity.png")
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def format_table(results: dict) -> str:
    """Test accuracy (%) per data set, routing order and ratio, and the dropless validation
    accuracy the recipe was chosen by: mean ± std over the seeds."""
    ratios = results["ratios"]
    rows = ["| data | routing | " + " | ".join(f"c={r:g}" for r in ratios)
            + " | dropless | valid, dropless |", "|---|---|" + "---|" * (len(ratios) + 2)]
    for name, d in results["data"].items():
        dropless = _mean_std([r["dropless"] * 100 for r in d["runs"]])
        valid = ("–" if d["runs"][0]["valid"] is None else
                 "{:.1f} ± {:.1f}".format(*_mean_std([r["valid"] * 100 for r in d["runs"]])))
        for policy in POLICIES:
            cells = [_mean_std([r[policy][i] * 100 for r in d["runs"]])
                     for i in range(len(ratios))]
            rows.append(f"| {name} | {policy} | "
                        + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in cells)
                        + f" | {dropless[0]:.1f} ± {dropless[1]:.1f} | {valid} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    plt = runs.pyplot()
    if plt is None:
        return
    data = results["data"]
    fig, axes = plt.subplots(1, len(data), figsize=(4.5 * len(data), 3.6), squeeze=False)
    ratios = results["ratios"]
    for ax, (name, d) in zip(axes[0], data.items(), strict=True):
        for policy, style in zip(POLICIES, ("o-", "s--"), strict=True):
            acc = np.array([r[policy] for r in d["runs"]]) * 100
            ax.errorbar(ratios, acc.mean(0), yerr=acc.std(0, ddof=1) if len(acc) > 1 else None,
                        fmt=style, capsize=3, label=policy)
        ax.axhline(np.mean([r["dropless"] for r in d["runs"]]) * 100, color="k", lw=0.8,
                   ls=":", label="dropless")
        ax.set_xlabel("inference capacity ratio c")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name} ({len(d['runs'])} seeds)")
        ax.legend()
    fig.tight_layout()
    runs.save_figure(fig, path, dpi=120)
    plt.close(fig)
