"""Where a trained MoE language model's load goes: the first MoE layer's balance over the
validation text, the test text and an equally long slice from the middle of the training text
(clean routing and with the training noise), then, for one of them (``--text``), the most
loaded experts with the input tokens that fill them and how the most frequent tokens are
spread over the experts::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_load_causes.py runs/table6/wi0.1_wl0.1
"""

import argparse

import torch

from sparsemoe.data import Vocabulary, load_corpus
from sparsemoe.experiments.lm import load_trained
from sparsemoe.experiments.table6 import load_by_token, routing_balance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory (with its checkpoint)")
    p.add_argument("--experts", type=int, default=6, help="most loaded experts to show")
    p.add_argument("--frequent", type=int, default=8, help="most frequent tokens to show")
    p.add_argument("--text", choices=("valid", "test", "train"), default="valid",
                   help="the text whose load the two token tables break down")
    a = p.parse_args()
    model, ck = load_trained(a.run)
    cfg = ck["config"]
    corpus = load_corpus(cfg["corpus"], vocab=Vocabulary(ck["vocab"]))
    words, b, L = ck["vocab"], cfg["batch_size"], cfg["bptt"]
    n = len(corpus.valid)
    middle = len(corpus.train) // 2
    texts = {"valid": corpus.valid, "test": corpus.test,
             "train": corpus.train[middle: middle + n]}  # the middle of the training text
    print(f"{a.run}, step {ck['step']}; each text {n:,} tokens or the test's {len(corpus.test):,}")
    print("| text | routing | CV(Importance) | CV(Load) | max/mean load |\n|---|---|---|---|---|")
    for name, tokens in texts.items():
        for noisy in (False, True):
            torch.manual_seed(0)
            s = routing_balance(model, tokens, b, L, noisy=noisy)
            print(f"| {name} | {'noisy' if noisy else 'clean'} | {s['cv_importance']:.3f} | "
                  f"{s['cv_load']:.3f} | {s['max_over_mean_load']:.2f} |")
    counts = load_by_token(model, texts[a.text], b, L, len(words)).double()  # [V, n]
    load = counts.sum(0)
    mean = load.mean()
    share = counts.sum(1) / counts.sum()  # each token's share of the positions
    print(f"\nThe {a.text} text's load by input token:")
    print("\n| expert | load / mean | its top input tokens (pairs, token's share of the text) |"
          "\n|---|---|---|")
    for e in load.argsort(descending=True)[: a.experts].tolist():
        top = counts[:, e].argsort(descending=True)[:4].tolist()
        cells = ", ".join(f"`{words[t]}` {int(counts[t, e])} ({share[t]:.1%})" for t in top)
        print(f"| {e} | {load[e] / mean:.2f} | {cells} |")
    print("\n| token | share of the text | experts used | share of its pairs on its top 4 | "
          "its top expert's load / mean |\n|---|---|---|---|---|")
    for t in share.argsort(descending=True)[: a.frequent].tolist():
        row = counts[t].sort(descending=True).values
        top = int(counts[t].argmax())
        print(f"| `{words[t]}` | {share[t]:.1%} | {int((row > 0).sum())} | "
              f"{row[:4].sum() / row.sum():.2f} | {load[top] / mean:.2f} |")


if __name__ == "__main__":
    main()
