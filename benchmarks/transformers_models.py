"""Whole ``transformers`` MoE models with their experts through "sparsemoe" and through
transformers' own implementations ("eager", "grouped_mm", "batched_mm"), side by side.

One model of each shape (Mixtral: 8 experts of width ``--hidden``, top-2; Qwen3-MoE:
``--experts`` narrow experts, top-8), random weights, float32, one thread. Each row times the
same work with every implementation, alternating them, and reports medians in ms and the ratio
sparsemoe / each:

- ``train``: forward + backward of the LM loss on ``--batch × --seq`` tokens;
- ``prefill``: a no-grad forward of one ``--prefill``-token sequence;
- ``decode bB``: one greedy step of a batch of ``B`` sequences with a KV cache (1 new token each).

    OMP_NUM_THREADS=1 python benchmarks/transformers_models.py                 # a few minutes
    OMP_NUM_THREADS=1 python benchmarks/transformers_models.py --d-model 1024 --layers 4 \\
        --experts 64 --prefill 2048                                            # the issue's size
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import sparsemoe.interop.backend  # noqa: F401  registers "sparsemoe"

IMPLS = ("sparsemoe", "eager", "grouped_mm", "batched_mm")


def _configs(args) -> dict[str, object]:
    common = dict(vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
                  num_attention_heads=args.d_model // 64, num_key_value_heads=args.d_model // 128,
                  max_position_embeddings=4096)
    return {
        "Mixtral-shaped (8 experts, top-2)": MixtralConfig(
            intermediate_size=args.hidden, num_local_experts=8, num_experts_per_tok=2, **common),
        f"Qwen3-MoE-shaped ({args.experts} experts, top-8)": Qwen3MoeConfig(
            moe_intermediate_size=args.hidden // 4, num_experts=args.experts,
            num_experts_per_tok=8, intermediate_size=args.hidden, **common),
    }


def _ms(fn, clock) -> float:
    start = clock()
    fn()
    return 1e3 * (clock() - start)


def _tasks(model, args):
    gen = torch.Generator().manual_seed(0)
    train_ids = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)
    prefill_ids = torch.randint(args.vocab, (1, args.prefill), generator=gen)

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        model(input_ids=train_ids, labels=train_ids).loss.backward()

    def prefill():
        model.eval()
        with torch.no_grad():
            model(input_ids=prefill_ids, use_cache=False)

    def decode(batch):
        ids = torch.randint(args.vocab, (batch, args.context), generator=gen)
        with torch.no_grad():
            cache = model.eval()(input_ids=ids, use_cache=True).past_key_values
        step = torch.randint(args.vocab, (batch, 1), generator=gen)
        positions = torch.full((batch, 1), args.context)

        def run():
            with torch.no_grad():
                # the same cache each time: crop back to the context after the step
                model(input_ids=step, cache=cache, position_ids=positions,
                      use_cache=True)
                cache.crop(-1)
        return run

    tasks = {"train": train, "prefill": prefill, "decode b1": decode(1), "decode b8": decode(8)}
    return {name: fn for name, fn in tasks.items() if name.split()[0] in args.tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024, help="Mixtral expert width (Qwen3: /4)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--context", type=int, default=32,
                        help="cached tokens before a decode step")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--tasks", nargs="+", default=["train", "prefill", "decode"],
                        choices=["train", "prefill", "decode"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: the process's CPU time, for one thread on a shared machine")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    impls = args.impls.split(",")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, d_model {args.d_model}, {args.layers} layers, float32, "
          f"1 thread, {args.clock} clock; medians of {args.reps}")
    for name, config in _configs(args).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
        tasks = _tasks(model, args)
        ms = {row: {impl: [] for impl in impls} for row in tasks}
        for row, fn in tqdm(tasks.items(), desc=name):
            for impl in impls:  # one warm-up each
                model.set_experts_implementation(impl)
                fn()
            for _ in range(args.reps):  # alternate the implementations
                for impl in impls:
                    model.set_experts_implementation(impl)
                    ms[row][impl].append(_ms(fn, clock))
        others = [i for i in impls if i != "sparsemoe"]
        print(f"\n{name}\n")
        print("| task | " + " | ".join(f"{i} ms" for i in impls) + " | "
              + " | ".join(f"sparsemoe/{i}" for i in others) + " |")
        print("|---" * (len(impls) + len(others) + 1) + "|")
        for row, times in ms.items():
            med = {i: sorted(t)[len(t) // 2] for i, t in times.items()}
            print(f"| {row} | " + " | ".join(f"{med[i]:.1f}" for i in impls) + " | "
                  + " | ".join(f"{med['sparsemoe'] / med[i]:.2f}" for i in others) + " |")


if __name__ == "__main__":
    main()
