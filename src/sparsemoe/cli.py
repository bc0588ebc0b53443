"""The ``sparsemoe`` command line: argument parsing only; the work is in
:mod:`sparsemoe.experiments`.

Every command family (``lm``, ``dmoe``, ``classic``, ``mt``, ``vmoe``) has one function
``_add_<family>`` that adds its sub-commands, and one handler
``_<family>_<command>(args, parser)`` per sub-command (``parser`` is the sub-command's).
A training command's flags are built from its configuration dataclass (the field's name, type,
default and help text). Usage errors, and library errors that come from a flag's value, are
reported by ``parser.error`` (exit status 2, the message naming the flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .data import FetchError
from .experiments import lm
from .experiments.processes import DEFAULT_TIMEOUT, ExpertParallelRanks, OneProcess
from .experiments.runs import Interrupted
from .experiments.table6 import PAPER_TABLE6
from .models.architectures import ARCHITECTURES
from .models.lstm_lm import BALANCINGS, MIDDLES, LMConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(config: type, name: str) -> Any:
    """The type of ``config``'s field ``name`` as a flag takes it: ``X`` for ``X | None``."""
    kind = typing.get_type_hints(config)[name]
    if isinstance(kind, types.UnionType):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return kind


def _add_config_arguments(
    parser: argparse.ArgumentParser, config: type, *, skip: tuple[str, ...] = (),
    flags: dict[str, str] | None = None, required: tuple[str, ...] = (),
) -> None:
    """One flag per field of the dataclass ``config`` (``--batch-size`` for ``batch_size``, or
    the name in ``flags``), with the field's type, default and ``metadata`` (help, choices);
    the fields in ``required`` must be given. Every flag's parsed default is None: the
    dataclass fills in its own default."""
    flags = flags or {}
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        kind = _flag_type(config, f.name)
        options: dict[str, Any] = {"dest": f.name, "default": None}
        if kind is bool:  # a switch: given, True; absent, the dataclass's default
            options["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:
            options["nargs"] = "+"
            kind = typing.get_args(kind)[0]
        if kind is not bool:
            options["type"] = kind
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(default) if isinstance(default, tuple) else default
        help_text = f.metadata.get("help", "")
        if f.name not in required:
            help_text = f"{help_text} (default: {shown})"
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if f.name in required:
            options["required"] = True
        options["help"] = help_text
        parser.add_argument(flags.get(f.name, _flag(f.name)), **options)


@contextmanager
def _data_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A data source that is missing or cannot be fetched (the library's message names the
    argument: corpus, mnist_dir, the checkpoint) is a usage error."""
    try:
        yield
    except (FileNotFoundError, FetchError) as e:
        parser.error(str(e))


def _config_from(parser: argparse.ArgumentParser, config: type, args: argparse.Namespace,
                 **values: Any) -> Any:
    """``config`` from the flags that were given (and ``values``); a ValueError or TypeError
    of the dataclass becomes a usage error."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)
             if getattr(args, f.name, None) is not None}
    try:
        return config(**{**given, **values})
    except (ValueError, TypeError) as e:
        parser.error(str(e))


# lm: the paper's language-model experiment

_LM_MODEL_FLAGS = {"num_experts": "--experts", "d_model": "--d-model"}
_LM_MODEL_HELP = {"middle": "middle layer", "num_experts": "experts", "k": "experts per token "
                  "(flat MoE)", "hidden": "expert hidden width", "d_model": "model width",
                  "groups": "hierarchical MoE groups", "dropout": "dropout probability",
                  "balancing": "how the flat MoE is balanced: paper (noisy top-k, CV losses), "
                  "switch (top-k, Switch loss), aux-free (DeepSeek-V3 bias)",
                  "gate_init_std": "noisy top-k gates: W_g ~ N(0, std²) instead of the paper's "
                  "zeros (default: the preset's)",
                  "bias_update_speed": "aux-free balancing: γ of the bias update after each "
                  "optimiser step (default: DeepSeek-V3's 1e-3)"}


def _lm_arch(args: argparse.Namespace) -> str:
    return args.arch or lm.LMTrainConfig.arch


def _lm_train_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     **values: Any) -> lm.LMTrainConfig:
    model = {k: getattr(args, k) for k in _LM_MODEL_HELP if getattr(args, k, None) is not None}
    arch = _lm_arch(args)
    foreign = sorted(set(model) - ARCHITECTURES[arch].field_names())
    if foreign:
        parser.error(f"{', '.join(_LM_MODEL_FLAGS.get(k, _flag(k)) for k in foreign)}: not a "
                     f"setting of arch {arch!r}")
    if args.steps is None and args.time_budget is not None:
        values["steps"] = None  # until the time budget
    return _config_from(parser, lm.LMTrainConfig, args, model=model, **values)


def _lm_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.preset is None and args.num_experts is None and args.middle is None:
        parser.error("lm train: give --preset NAME or a model (--experts N --k K ...)")
    cfg = _lm_train_config(parser, args, preset=args.preset)
    distributed = args.expert_parallel or args.data_parallel is not None
    mesh_only = [flag for flag, given in (("--replicate", args.replicate),
                                          ("--exchange-capacity",
                                           args.exchange_capacity is not None)) if given]
    if mesh_only and not distributed:
        parser.error(f"{', '.join(mesh_only)}: a layout of the device mesh; give "
                     f"--data-parallel N or --expert-parallel (under torchrun) too")
    if args.exchange_capacity is not None and args.exchange_capacity < 1:
        parser.error(f"--exchange-capacity must be at least 1 row per expert, got "
                     f"{args.exchange_capacity}")
    processes = ExpertParallelRanks.start(args.rank_timeout, args.data_parallel or 1,
                                          args.replicate, args.exchange_capacity) \
        if distributed else OneProcess()
    try:
        with _data_errors(parser):
            metrics = lm.Trainer(cfg, processes=processes).run()
    finally:
        processes.close()
    keys = ("valid_perplexity", "test_perplexity", "tokens_per_second", "params_total",
            "params_active_per_token", "multiply_adds_per_token", "load", "exchange")
    if processes.rank == 0:
        print(json.dumps({k: metrics[k] for k in keys}, indent=1))


def _lm_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    with _data_errors(parser):
        metrics = lm.evaluate_checkpoint(args.checkpoint, args.corpus and tuple(args.corpus))
    print(json.dumps(metrics, indent=1))


def _lm_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import lm_report

    sets = ARCHITECTURES[_lm_arch(args)].preset_sets
    names = sets.get(args.presets) or [p.strip() for p in args.presets.split(",")]
    base = _lm_train_config(parser, args, preset=None)
    for name in names:  # the presets are checked by the configuration, as --preset
        _config_from(parser, lm.LMTrainConfig, args, **{**vars(base), "preset": name})
    if args.evaluations < 1:
        parser.error(f"--evaluations must be at least 1, got {args.evaluations}")
    with _data_errors(parser):
        lm_report.compare(list(names), base, args.out, time_budget=args.time_budget,
                          evaluations=args.evaluations)


def _lm_table6(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import table6

    if _lm_arch(args) != "lstm":
        parser.error(f"--arch: lm table6 measures the LSTM language model's MoE layer, so it "
                     f"must be 'lstm', got {args.arch!r}")
    try:
        weightings = [table6.parse_weighting(w) for w in args.weightings]
    except ValueError as e:
        parser.error(f"--weightings: {e}")
    base = _lm_train_config(parser, args, preset=args.preset)
    with _data_errors(parser):
        rows = table6.table6(base, weightings)
    print(table6.write_report(rows, base.out))
    print(f"\nwrote table6.md, table6.json and balance.png in {base.out}")


def _lm_upcycle(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import lm_upcycle

    if _lm_arch(args) != "transformer":
        parser.error(f"--arch: lm upcycle upcycles the Transformer, so it must be "
                     f"'transformer', got {args.arch!r}")
    num_experts, k = args.num_experts or 8, args.k or 2  # the upcycled MoE's, not the dense's
    args.num_experts = args.k = None
    base = _lm_train_config(parser, args, preset=args.preset)
    scratch = None if args.scratch == "none" else args.scratch
    try:
        with _data_errors(parser):
            lm_upcycle.upcycle_demo(base, base.out, args.continue_steps, num_experts, k,
                                    args.noise, args.seeds, scratch)
    except ValueError as e:
        parser.error(str(e))
    print(f"\nwrote {lm_upcycle.REPORT}, upcycle.json and upcycle_curves.png in {base.out}")


def _lm_experts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import lm_report

    with _data_errors(parser):
        report = lm_report.expert_contexts(args.checkpoint, experts=args.experts, top=args.top)
    print(report)


def _add_lm(sub: Any) -> None:
    parser = sub.add_parser("lm", help="the paper's language-model experiment")
    lm_sub = parser.add_subparsers(dest="lm_command", required=True)

    def training_flags(p: argparse.ArgumentParser) -> None:
        _add_config_arguments(p, lm.LMTrainConfig, skip=("preset", "model"), required=("out",))
        choices = {"middle": MIDDLES, "balancing": BALANCINGS}
        for name in _LM_MODEL_HELP:
            p.add_argument(_LM_MODEL_FLAGS.get(name, _flag(name)), dest=name,
                           type=_flag_type(LMConfig, name),
                           default=None, help=_LM_MODEL_HELP[name], choices=choices.get(name))

    train = lm_sub.add_parser("train", help="train one model (resumes from --out's checkpoint)")
    train.add_argument("--preset", default=None, help="; ".join(
        f"{name}: {', '.join(a.presets)}" for name, a in ARCHITECTURES.items()))
    train.add_argument("--expert-parallel", action="store_true",
                       help="spread the experts over the ranks that torchrun starts (gloo on "
                            "CPU, NCCL on GPU); --batch-size is then split over the ranks: "
                            "torchrun --nproc_per_node N --no-python sparsemoe lm train ... "
                            "--expert-parallel")
    train.add_argument("--data-parallel", type=int, default=None, metavar="N",
                       help="under torchrun: the device mesh's data-parallel size N (FSDP2); "
                            "the experts are spread over the other WORLD_SIZE / N ranks "
                            "(default with --expert-parallel: 1)")
    train.add_argument("--replicate", action="store_true",
                       help="on a mesh: replicate the model over the ranks (DDP's layout, "
                            "all-reduced gradients) instead of sharding it with FSDP2: more "
                            "memory per rank, no all-gathers")
    train.add_argument("--exchange-capacity", type=int, default=None, metavar="C",
                       help="on a mesh: the padded expert exchange, C rows from each rank to "
                            "each expert (static shapes, no host read of the counts); rows "
                            "beyond C are dropped and counted (progress bar, metrics.json's "
                            "exchange); default: the exact exchange")
    train.add_argument("--rank-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help="on a mesh: how long a rank waits for the others before the job "
                            "fails (a stopped or frozen rank); default "
                            f"{DEFAULT_TIMEOUT:.0f}")
    training_flags(train)
    train.set_defaults(func=_lm_train, command_parser=train)

    ev = lm_sub.add_parser("eval", help="validation and test perplexity of a trained run")
    ev.add_argument("--checkpoint", required=True, help="a run directory")
    ev.add_argument("--corpus", nargs="+", default=None,
                    help="evaluate on another corpus (default: the run's)")
    ev.set_defaults(func=_lm_eval, command_parser=ev)

    compare = lm_sub.add_parser("compare", help="train several presets for the same number "
                                "of tokens and write a Table-7-style report")
    compare.add_argument("--presets", default="quick",
                         help="comma-separated preset names or a set: " + "; ".join(
                             f"{name}: {', '.join(a.preset_sets)}"
                             for name, a in ARCHITECTURES.items()))
    compare.add_argument("--evaluations", type=int, default=6,
                         help="validations during each run (the curves' resolution)")
    training_flags(compare)
    compare.set_defaults(func=_lm_compare, command_parser=compare)

    t6 = lm_sub.add_parser("table6", help="Table 6: train one model per balancing-loss "
                           "weighting and write its balance table (resumes; rows already "
                           "trained are read back)")
    t6.add_argument("--preset", default="MoE-256", help="the model; flags such as --experts "
                    "override its fields (default: MoE-256)")
    t6.add_argument("--weightings", nargs="+", metavar="WI,WL",
                    default=[f"{wi},{wl}" for wi, wl in PAPER_TABLE6],
                    help="(w_importance, w_load) pairs, one model each (default: Table 6's "
                         "six: " + " ".join(f"{wi},{wl}" for wi, wl in PAPER_TABLE6) + ")")
    training_flags(t6)
    t6.set_defaults(func=_lm_table6, command_parser=t6)

    up = lm_sub.add_parser("upcycle", help="sparse upcycling: train a dense Transformer "
                           "--steps S, then continue it dense, upcycled (--experts copies, top "
                           "--k) and dense for the upcycled run's multiply-adds, "
                           "--continue-steps S2 each (resumes)")
    up.add_argument("--preset", default="dense-swiglu", help="the dense Transformer preset "
                    "(default: dense-swiglu)")
    up.add_argument("--continue-steps", type=int, required=True, metavar="S2",
                    help="steps of each branch after the upcycling point")
    up.add_argument("--noise", type=float, default=0.0,
                    help="relative noise on the expert copies (default: 0, exact copies)")
    up.add_argument("--seeds", type=int, default=1,
                    help="seeds --seed, --seed + 1, ... (default: 1)")
    up.add_argument("--scratch", default="mixtral-8", help="an MoE preset trained from scratch "
                    "for S + S2 steps for reference, or 'none' (default: mixtral-8)")
    training_flags(up)
    up.set_defaults(func=_lm_upcycle, command_parser=up)

    experts = lm_sub.add_parser("experts", help="contexts that route to a few experts (Table 9)")
    experts.add_argument("--checkpoint", required=True)
    experts.add_argument("--experts", type=int, default=6)
    experts.add_argument("--top", type=int, default=8)
    experts.set_defaults(func=_lm_experts, command_parser=experts)


# dmoe: the Deep Mixture of Experts

def _dmoe_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import dmoe

    cfg = _config_from(parser, dmoe.DMoETrainConfig, args)
    models = [m.strip() for m in args.models.split(",")]
    with _data_errors(parser):
        results = dmoe.train(models, cfg, args.out)
    for r in results:
        print(f"{r['model']}: test error {100 * r['test_error']:.2f}% "
              f"({r['parameters']:,} parameters, {r['train_seconds']:.0f} s)")


def _dmoe_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import dmoe

    print(dmoe.report(args.runs, args.figures))


def _add_dmoe(sub: Any) -> None:
    from .experiments.dmoe import MODELS, TABLE1, DMoETrainConfig

    parser = sub.add_parser("dmoe", help="the Deep Mixture of Experts on jittered digits")
    dmoe_sub = parser.add_subparsers(dest="dmoe_command", required=True)
    train = dmoe_sub.add_parser("train", help="train the DMoE and its baselines")
    train.add_argument("--models", default=",".join(TABLE1),
                       help=f"comma-separated, from {', '.join(MODELS)}")
    _add_config_arguments(train, DMoETrainConfig, flags={"num_experts": "--experts"})
    train.add_argument("--out", default="runs/dmoe", help="one folder per model is made here")
    train.set_defaults(func=_dmoe_train, command_parser=train)
    report = dmoe_sub.add_parser("report", help="the Table-1-style table, gate mutual "
                                 "information and heatmaps of trained runs")
    report.add_argument("--runs", default="runs/dmoe")
    report.add_argument("--figures", default=None, help="folder for dmoe_gates_<model>.png")
    report.set_defaults(func=_dmoe_report, command_parser=report)


# classic: classical mixtures of experts

def _classic_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments.classic import ComparisonConfig, run_report

    cfg = ComparisonConfig(folds=args.folds, repeats=args.repeats, seed=args.seed,
                           n_init=args.n_init)
    print(run_report(args.out, cfg))
    print(f"\nwrote {args.out / 'classic_mcycle.png'}")


def _add_classic(sub: Any) -> None:
    parser = sub.add_parser("classic", help="classical mixtures of experts (scikit-learn style)")
    classic_sub = parser.add_subparsers(dest="classic_command", required=True)
    report = classic_sub.add_parser(
        "report", help="held-out comparison on mcycle and diabetes, and the mcycle plot")
    report.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNG")
    report.add_argument("--folds", type=int, default=5)
    report.add_argument("--repeats", type=int, default=2)
    report.add_argument("--n-init", type=int, default=5, help="restarts of every mixture fit")
    report.add_argument("--seed", type=int, default=0)
    report.set_defaults(func=_classic_report, command_parser=report)


# mt: the paper's translation experiments

_MT_MODEL_HELP = {"gating": "flat MoE gating (default: the preset's)",
                  "dropout": "dropout probability (default: the preset's)",
                  "d_model": "model width (default: the preset's)"}


def _mt_train_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     **values: Any):
    from .experiments import mt

    model = {k: getattr(args, k) for k in _MT_MODEL_HELP if getattr(args, k, None) is not None}
    if args.steps is None and args.time_budget is not None:
        values["steps"] = None  # until the time budget
    return _config_from(parser, mt.MTTrainConfig, args, model=model, **values)


def _mt_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import mt

    cfg = _mt_train_config(parser, args, preset=args.preset)
    with _data_errors(parser):
        metrics = mt.Trainer(cfg).run()
    keys = ("valid_perplexity", "test_perplexity", "test_bleu", "test_chrf",
            "test_bleu_batchwise_mask", "tokens_per_second", "params_total",
            "multiply_adds_per_timestep", "load")
    print(json.dumps({k: metrics[k] for k in keys}, indent=1))


def _mt_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import mt

    with _data_errors(parser):
        metrics = mt.evaluate_checkpoint(args.checkpoint, args.test_sentences, args.beam)
    print(json.dumps(metrics, indent=1, ensure_ascii=False))


def _mt_translate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import mt

    with _data_errors(parser):
        lines = (Path(args.input).read_text(encoding="utf-8") if args.input else
                 sys.stdin.read()).splitlines()
        out = mt.translate_checkpoint(args.checkpoint, lines, args.to, args.beam, args.alpha,
                                      progress=args.input is not None)
    sys.stdout.write("".join(f"{line}\n" for line in out))


def _mt_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import mt
    from .models.seq2seq import PRESET_SETS as MT_SETS

    names = MT_SETS.get(args.presets) or [p.strip() for p in args.presets.split(",")]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    base = _mt_train_config(parser, args, preset=None)
    for name in names:  # the presets are checked by the configuration, as --preset
        _config_from(parser, mt.MTTrainConfig, args, **{**vars(base), "preset": name})
    with _data_errors(parser):
        mt.compare(list(names), seeds, base, args.out, time_budget=args.time_budget)


def _add_mt(sub: Any) -> None:
    from .experiments.mt import MTTrainConfig
    from .models.seq2seq import GATINGS, Seq2SeqConfig
    from .models.seq2seq import PRESET_SETS as MT_SETS
    from .models.seq2seq import PRESETS as MT_PRESETS

    parser = sub.add_parser("mt", help="the paper's translation experiments (GNMT-style MoE)")
    mt_sub = parser.add_subparsers(dest="mt_command", required=True)

    def training_flags(p: argparse.ArgumentParser) -> None:
        _add_config_arguments(p, MTTrainConfig, skip=("preset", "model"), required=("out",))
        for name, help_text in _MT_MODEL_HELP.items():
            p.add_argument(_flag(name), dest=name, type=type(getattr(Seq2SeqConfig, name)),
                           default=None, help=help_text,
                           choices=GATINGS if name == "gating" else None)

    train = mt_sub.add_parser("train", help="train one model (resumes from --out's checkpoint)")
    train.add_argument("--preset", default=MTTrainConfig.preset,
                       help=f"one of {', '.join(MT_PRESETS)} (default: {MTTrainConfig.preset})")
    training_flags(train)
    train.set_defaults(func=_mt_train, command_parser=train)

    ev = mt_sub.add_parser("eval", help="perplexity and BLEU of a trained run")
    ev.add_argument("--checkpoint", required=True, help="a run directory")
    ev.add_argument("--test-sentences", type=int, default=None,
                    help="BLEU on the first N test pairs of each direction (default: the run's)")
    ev.add_argument("--beam", type=int, default=None, help="beam width (default: the run's)")
    ev.set_defaults(func=_mt_eval, command_parser=ev)

    tr = mt_sub.add_parser("translate", help="translate lines from stdin (or --input) to stdout")
    tr.add_argument("--checkpoint", required=True, help="a run directory")
    tr.add_argument("--input", default=None, help="a text file, one sentence per line")
    tr.add_argument("--to", default=None, help="target language of a multilingual model")
    tr.add_argument("--beam", type=int, default=MTTrainConfig.beam)
    tr.add_argument("--alpha", type=float, default=MTTrainConfig.alpha,
                    help="length normalisation")
    tr.set_defaults(func=_mt_translate, command_parser=tr)

    compare = mt_sub.add_parser("compare", help="train presets × seeds and write the "
                                "Table-2/Table-5-shaped report")
    compare.add_argument("--presets", default="dense-vs-moe",
                         help=f"comma-separated preset names or a set: {tuple(MT_SETS)}")
    compare.add_argument("--seeds", default="0", help="comma-separated seeds")
    training_flags(compare)
    compare.set_defaults(func=_mt_compare, command_parser=compare)


# vmoe: the Vision MoE's inference capacity

def _vmoe_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .experiments import vmoe

    cfg = _config_from(parser, vmoe.VMoEConfig, args)
    data = tuple(d.strip() for d in args.data.split(","))
    for name in data:
        if name not in vmoe.DATA_SETS:
            parser.error(f"--data: each must be one of {vmoe.DATA_SETS}, got {name!r}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    with _data_errors(parser):
        vmoe.run(args.out, data, args.seeds, cfg)
    print(f"\nwrote {Path(args.out) / 'vmoe_capacity.png'}")


def _add_vmoe(sub: Any) -> None:
    from .experiments.vmoe import VMoEConfig

    parser = sub.add_parser("vmoe", help="the Vision MoE's accuracy against the inference "
                            "capacity ratio, with and without Batch Prioritized Routing")
    vmoe_sub = parser.add_subparsers(dest="vmoe_command", required=True)
    run = vmoe_sub.add_parser("run", help="train on digits and evaluate the capacity curve")
    run.add_argument("--data", default="mnist5k,digits8",
                     help="comma-separated: mnist5k (fetched on first use), digits8")
    run.add_argument("--seeds", type=int, default=3, help="models trained per data set")
    _add_config_arguments(run, VMoEConfig, flags={"num_experts": "--experts"})
    run.add_argument("--out", default="runs/vmoe")
    run.set_defaults(func=_vmoe_run, command_parser=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemoe", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_family in (_add_lm, _add_dmoe, _add_classic, _add_mt, _add_vmoe):
        add_family(sub)
    return parser


USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError)
"""What a wrong argument, file or environment raises in sparsemoe (RunError and FetchError
are RuntimeErrors); ``main`` reports them in one line, or with the traceback under --debug."""


def main(argv: list[str] | None = None) -> None:
    """Run a command. A usage error exits with status 2 (argparse); a user error found while
    running exits with status 1 and one line on stderr (130/143 after SIGINT/SIGTERM, once
    the run is saved), without a traceback unless ``--debug``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args, args.command_parser)
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
