"""A shared subword vocabulary for source and target, trained with the ``tokenizers`` library.

Byte-pair encoding over NFKC text pre-split on spaces the way SentencePiece does it (Metaspace:
``▁`` marks a word start), so text in any script, including Japanese and Korean without spaces
between words, decodes back exactly (up to the normalisation and runs of spaces). The paper
uses a shared wordpiece vocabulary (GNMT's); BPE is the same kind of greedy subword model.

Special tokens: ``<pad>`` = 0, ``<unk>``, ``<s>`` (decoder start), ``</s>`` (end), then the
target-language tokens ``<2xx>`` of a multilingual corpus, each kept whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - the mt extra installs it
        raise ImportError("the translation experiment needs the 'tokenizers' package: "
                          "pip install 'sparsemoe[mt]'") from e
    return tokenizers


class SubwordTokenizer:
    """Encode text to ids and back with a trained BPE model.

    Build with :meth:`train` or :meth:`from_json`; :meth:`to_json` serialises it (the
    checkpoint keeps it as a string).
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.pad_id = self.tok.token_to_id(PAD)
        self.unk_id = self.tok.token_to_id(UNK)
        self.bos_id = self.tok.token_to_id(BOS)
        self.eos_id = self.tok.token_to_id(EOS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              extra_tokens: Sequence[str] = ()) -> SubwordTokenizer:
        """Learn ``vocab_size`` symbols (special tokens included) from ``texts``."""
        tk = _require_tokenizers()
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        tok = tk.Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        specials = [PAD, UNK, BOS, EOS, *extra_tokens]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> SubwordTokenizer:
        return cls(_require_tokenizers().Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tok.to_str()

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without ``<s>``/``</s>``."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text of each id sequence; special tokens are dropped."""
        return self.tok.decode_batch([list(i) for i in ids], skip_special_tokens=True)
