"""The tiny generated corpus the language-model experiment tests train on (a test module may
define its own ``corpus_file``)."""

import random

import pytest


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "of", "a", "land", "far", "away", "went", "to",
             "see", "the", "sea", "with", "ships"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines))
    return str(path)
