"""The gate's scales in trained language models: the noise stddev of eq. 4 against the spread
of the clean logits x·W_g over the first validation tokens (shared by every token, and per
token), next to the clean and noisy balance of the same text::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lm_gate_scales.py runs/table6/wi0.1_wl0.1
"""

import argparse
import json

from sparsemoe.data import Vocabulary, load_corpus
from sparsemoe.experiments.lm import load_trained
from sparsemoe.experiments.table6 import gate_scales, routing_balance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (with checkpoint.pt)")
    p.add_argument("--tokens", type=int, default=5000, help="validation tokens to read")
    a = p.parse_args()
    corpus = None
    for run in a.runs:
        model, ck = load_trained(run)
        cfg = ck["config"]
        if corpus is None or corpus.vocab.words != ck["vocab"]:
            corpus = load_corpus(cfg["corpus"], vocab=Vocabulary(ck["vocab"]))
        tokens = corpus.valid[: a.tokens + 1]
        b, L = cfg["batch_size"], cfg["bptt"]
        report = {"run": run, "step": ck["step"], **gate_scales(model, tokens, b, L),
                  "clean": routing_balance(model, tokens, b, L),
                  "noisy": routing_balance(model, tokens, b, L, noisy=True)}
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
