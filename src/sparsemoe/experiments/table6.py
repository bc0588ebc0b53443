"""Table 6 of Shazeer et al. (2017) in miniature: the balancing losses' weights against the
balance they reach, for the language model's MoE layer.

For each ``(w_importance, w_load)`` the model is trained with

    L = CE + w_importance·CV(Importance(X))² + w_load·CV(Load(X))²        (eqs. 7 and 11)

and the balance of its first MoE layer is measured over the whole validation text:
Importance_i = Σ_x G(x)_i (eq. 6), Load_i = the number of tokens routed to expert i (the count
of non-zero gates, the evaluation-mode load), and max(Load)/mean(Load).

:class:`BalanceTrainer` also records, during training, the same statistics per training batch
(with the training noise, ``Load`` then being eq. 10's smooth estimator for the CV and the
routed counts for max/mean), over the first ``eval_tokens`` validation tokens both without and
with the gating noise, and the gradient the two loss terms send to the gate, so that the cause
of an imbalance can be read off the run. :func:`write_report` writes ``table6.md``,
``table6.json`` and ``balance.png``; ``sparsemoe lm table6`` runs all of it from the command
line.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Corpus, eval_batches, load_corpus
from ..module import MoEStats
from . import runs
from .lm import LMTrainConfig, Trainer, stream_forward

PAPER_TABLE6: dict[tuple[float, float], tuple[float, float, float, float]] = {
    (0.0, 0.0): (39.8, 3.04, 3.01, 17.80),
    (0.2, 0.0): (35.6, 0.06, 0.17, 1.47),
    (0.0, 0.2): (35.7, 0.22, 0.04, 1.15),
    (0.1, 0.1): (35.6, 0.06, 0.05, 1.14),
    (0.01, 0.01): (35.7, 0.48, 0.11, 1.37),
    (1.0, 1.0): (35.7, 0.03, 0.02, 1.07),
}
"""The paper's Table 6 (MoE-256 on the 1B-word benchmark, 10 epochs):
``(w_importance, w_load) -> (test PPL, CV(Importance), CV(Load), max(Load)/mean(Load))``."""

WEIGHTINGS = tuple(PAPER_TABLE6)


def balance_statistics(importance: Tensor, tokens_per_expert: Tensor) -> dict:
    """CV(Importance), CV(Load), max(Load)/mean(Load) and the number of unused experts.

    Args:
        importance: ``[n]`` Σ_x G(x) per expert.
        tokens_per_expert: ``[n]`` the tokens routed to each expert (the load).
    """
    s = MoEStats(importance, tokens_per_expert, tokens_per_expert)
    return {"cv_importance": s.cv_importance, "cv_load": s.cv_load,
            "max_over_mean_load": s.max_over_mean_load,
            "experts_unused": int((tokens_per_expert == 0).sum())}


def _read_text(model: torch.nn.Module, tokens: Tensor, batch_size: int, bptt: int,
               noisy: bool = False):
    """:func:`~sparsemoe.experiments.lm.stream_forward` over ``tokens`` with the model in
    evaluation mode, its first MoE layer's router in training mode if ``noisy`` (the gating
    noise of eq. 4); the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    model.moe_layers()[0].router.train(noisy)
    try:
        yield from stream_forward(model, tokens, batch_size, bptt)
    finally:
        model.train(was_training)


@torch.no_grad()
def routing_balance(
    model: torch.nn.Module, tokens: Tensor, batch_size: int, bptt: int, noisy: bool = False
) -> dict:
    """:func:`balance_statistics` of the model's first MoE layer, summed over ``tokens`` read
    as the evaluation reads them (``batch_size`` streams of ``bptt`` steps, state carried).

    ``noisy=False`` routes as in evaluation (clean logits, no noise); ``noisy=True`` routes
    the same text with the training noise of eq. 4 (the rest of the model in evaluation mode),
    which is the routing the balancing loss saw.
    """
    layer = model.moe_layers()[0]
    importance, load = 0.0, 0.0
    for _ in _read_text(model, tokens, batch_size, bptt, noisy):
        importance = importance + layer.stats.importance.double()
        load = load + layer.stats.tokens_per_expert.double()
    return balance_statistics(importance, load)


@torch.no_grad()
def load_by_token(model: torch.nn.Module, tokens: Tensor, batch_size: int, bptt: int,
                  vocab_size: int) -> Tensor:
    """The first MoE layer's clean routing of ``tokens`` (read as :func:`routing_balance`
    reads them) broken down by the input token: ``[vocab_size, n]`` int64, entry ``(v, i)``
    the pairs routed to expert ``i`` at positions whose input token is ``v``. Its column sums
    are the load; its rows show how a frequent token is spread over the experts."""
    router = model.moe_layers()[0].router
    chosen: list[Tensor] = []
    counts = torch.zeros(vocab_size, router.num_experts, dtype=torch.int64)
    with router.register_forward_hook(
            lambda mod, inp, out: chosen.append(out.expert_indices.flatten(0, -2))):
        for _, _, positions in _read_text(model, tokens, batch_size, bptt):
            experts = chosen.pop()  # [b·l, k], rows in the positions' order
            ids = tokens[positions.reshape(-1)].long()[:, None].expand_as(experts)
            counts.index_put_((ids.reshape(-1), experts.reshape(-1)),
                              torch.ones(experts.numel(), dtype=torch.int64), accumulate=True)
    return counts


@torch.no_grad()
def gate_scales(model: torch.nn.Module, tokens: Tensor, batch_size: int, bptt: int) -> dict:
    """How the first MoE layer's clean logits x·W_g compare with its noise over ``tokens``
    (read as :func:`routing_balance` reads them, the model in evaluation mode).

    Returns ``noise_stddev``, the mean of Softplus(x·W_noise) + ε (eq. 4); ``common_spread``,
    the standard deviation over experts of the logits' mean over tokens (a preference every
    token shares, which sends the clean top-k to the same experts); ``token_spread``, the mean
    over tokens of the standard deviation over experts of the logits minus that mean (what
    tells tokens apart).
    """
    router = model.moe_layers()[0].router
    inputs: list[Tensor] = []
    with router.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])):
        for _ in _read_text(model, tokens, batch_size, bptt):
            pass
    x = torch.cat(inputs).double()
    logits = x @ router.w_gate.double()
    common = logits.mean(0)
    out = {"common_spread": float(common.std(correction=0)),
           "token_spread": float((logits - common).std(dim=1, correction=0).mean())}
    if router.w_noise is not None:
        sigma = F.softplus(x @ router.w_noise.double()) + router.noise_epsilon
        out["noise_stddev"] = float(sigma.mean())
    return out


def gate_gradients(trainer: Trainer, inputs: Tensor, targets: Tensor) -> dict:
    """The gradient norms the cross-entropy and the auxiliary loss each send to the first MoE
    layer's gate parameters on one training-mode batch, with the loss values; the model's
    gradients are left untouched."""
    model = trainer.model
    layer = model.moe_layers()[0]
    gate = dict(layer.router.named_parameters())
    logits, _ = model(inputs)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    aux = layer.aux_loss
    out = {"ce": ce.item(), "aux": aux.item()}
    for loss_name, loss in (("ce", ce), ("aux", aux)):
        if not loss.requires_grad:
            grads = [None] * len(gate)
        else:
            grads = torch.autograd.grad(loss, list(gate.values()), retain_graph=True,
                                        allow_unused=True)
        for (name, _), g in zip(gate.items(), grads, strict=True):
            out[f"grad_{loss_name}_{name}"] = 0.0 if g is None else g.norm().item()
    return out


class BalanceTrainer(Trainer):
    """A :class:`~sparsemoe.experiments.lm.Trainer` that also records the first MoE layer's
    balance: per training batch in ``history["batch"]`` (CV(Importance), CV(Load) of the
    smooth load, max/mean of the routed counts, the auxiliary loss), and at each validation in
    ``history["balance"]``: ``clean``, the evaluation routing over the text the validation read
    (all of it at the end of the run); ``noisy``, the same routing with the gating noise over
    the first ``eval_tokens`` validation tokens; :func:`gate_scales` over those tokens; and
    :func:`gate_gradients` on the first validation batch."""

    def train_step(self) -> float:
        ce = super().train_step()
        layer = self.model.moe_layers()[0]
        stats = layer.stats.as_dict()
        del stats["drop_fraction"]
        self.history.setdefault("batch", []).append({**stats, "aux": layer.aux_loss.item()})
        return ce

    def validate(self, max_tokens: int | None) -> dict:
        layer = self.model.moe_layers()[0]
        sums = {"importance": 0.0, "load": 0.0}

        def accumulate(module, inputs, output):
            sums["importance"] = sums["importance"] + module.stats.importance.double()
            sums["load"] = sums["load"] + module.stats.tokens_per_expert.double()

        hook = layer.register_forward_hook(accumulate)
        try:
            v = super().validate(max_tokens)
        finally:
            hook.remove()
        c = self.cfg
        head = self.corpus.valid[: (max_tokens or c.eval_tokens or len(self.corpus.valid)) + 1]
        inputs, targets, _ = next(eval_batches(head, c.batch_size, c.bptt))
        self.history.setdefault("balance", []).append({
            "step": self.step, "tokens": v["tokens"],
            "clean": balance_statistics(sums["importance"], sums["load"]),
            "noisy": routing_balance(self.model, head, c.batch_size, c.bptt, noisy=True),
            "scales": gate_scales(self.model, head, c.batch_size, c.bptt),
            **gate_gradients(self, inputs, targets)})
        return v


def run_weighting(
    base: LMTrainConfig, w_importance: float, w_load: float, corpus: Corpus | None = None,
    progress: bool = True,
) -> dict:
    """Train ``base`` with the given loss weights (into ``base.out``) and return its Table-6
    row: the weights, test and validation perplexity, the balance of the evaluation routing
    over the whole validation text, the noisy routing's over its first ``eval_tokens``, and
    the training history.
    """
    cfg = replace(base, model={**base.model, "w_importance": w_importance, "w_load": w_load})
    metrics = BalanceTrainer(cfg, corpus, progress=progress).run()
    final = metrics["history"]["balance"][-1]  # the whole validation text, from finish()
    row = {"w_importance": w_importance, "w_load": w_load,
           "test_perplexity": metrics["test_perplexity"],
           "valid_perplexity": metrics["valid_perplexity"], **final["clean"],
           "noisy": final["noisy"], "steps": metrics["steps"], "history": metrics["history"]}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    runs.write_json(Path(cfg.out) / "table6_row.json", row)
    return row


def table6(base: LMTrainConfig, weightings=WEIGHTINGS, progress: bool = True) -> list[dict]:
    """Table 6 in miniature: ``base`` (e.g. ``preset="MoE-256"``) trained once per
    ``(w_importance, w_load)`` on the same corpus, data order and seed, each into
    ``base.out/wi{w_importance}_wl{w_load}``. Returns the rows of :func:`run_weighting`; a
    weighting already trained to ``base.steps`` there is read back from its
    ``table6_row.json``."""
    corpus = None
    rows = []
    for wi, wl in weightings:
        cfg = replace(base, out=str(Path(base.out) / f"wi{wi}_wl{wl}"))
        done = Path(cfg.out) / "table6_row.json"
        if done.exists() and json.loads(done.read_text())["steps"] == cfg.steps:
            rows.append(json.loads(done.read_text()))  # finished by an earlier call
            continue
        corpus = corpus or load_corpus(base.corpus, base.vocab_size)
        rows.append(run_weighting(cfg, wi, wl, corpus, progress))
    return rows


def format_table6(rows: list[dict]) -> str:
    """Markdown table in the shape of Table 6, each measured value next to the paper's (in
    brackets, where the paper has that weighting)."""
    lines = ["| w_importance | w_load | test PPL | CV(Importance) | CV(Load) | "
             "max(Load)/mean(Load) | unused experts |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = PAPER_TABLE6.get((r["w_importance"], r["w_load"]))
        ours = (r["test_perplexity"], r["cv_importance"], r["cv_load"], r["max_over_mean_load"])
        cells = [f"{v:.1f}" if i == 0 else f"{v:.2f}" for i, v in enumerate(ours)]
        if paper is not None:
            cells = [f"{c} ({p:.2f})" if i else f"{c} ({p:.1f})"
                     for i, (c, p) in enumerate(zip(cells, paper, strict=True))]
        lines.append(f"| {r['w_importance']} | {r['w_load']} | {' | '.join(cells)} | "
                     f"{r['experts_unused']} |")
    return "\n".join(lines)


def parse_weighting(text: str) -> tuple[float, float]:
    """``"w_importance,w_load"`` (e.g. ``"0.1,0.1"``) as two non-negative floats."""
    parts = text.split(",")
    try:
        wi, wl = (float(v) for v in parts)
    except ValueError:
        raise ValueError(f"a weighting must be two numbers 'w_importance,w_load' such as "
                         f"'0.1,0.1', got {text!r}") from None
    if wi < 0 or wl < 0:
        raise ValueError(f"a weighting's w_importance and w_load must be >= 0, got {text!r}")
    return wi, wl


def plot_balance(rows: list[dict], path: str | Path) -> Path:
    """max/mean load of each row's run: per training batch (noisy routing) and at each
    validation over the validation text, with the evaluation routing and with the gating
    noise; one line per weighting, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for r in rows:
        label = f"({r['w_importance']}, {r['w_load']})"
        batch = [b["max_over_mean_load"] for b in r["history"]["batch"]]
        line, = axes[0].plot(range(1, len(batch) + 1), batch, lw=0.6, label=label)
        bal = r["history"]["balance"]
        for ax, key in ((axes[1], "clean"), (axes[2], "noisy")):
            ax.plot([b["step"] for b in bal], [b[key]["max_over_mean_load"] for b in bal], "o-",
                    color=line.get_color(), label=label)
    axes[0].set_title("per training batch (noisy routing)")
    axes[1].set_title("validation text, evaluation routing")
    axes[2].set_title("validation text, with the gating noise")
    axes[0].set_ylabel("max / mean load")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.6)
    axes[0].legend(title="(w_importance, w_load)", fontsize=8)
    fig.tight_layout()
    try:
        return runs.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def write_report(rows: list[dict], out: str | Path) -> str:
    """Write ``out/table6.md`` (:func:`format_table6`), ``out/table6.json`` (the rows with
    their training histories) and ``out/balance.png`` (:func:`plot_balance`); returns the
    table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table6(rows)
    runs.write_text(out / "table6.md", table + "\n")
    runs.write_json(out / "table6.json", rows)
    plot_balance(rows, out / "balance.png")
    return table
