"""Text batches for the BERT family: fast-tokenizer batches padded to a few bucket lengths.

Padding every batch to its own longest sequence would make jit compile one program per length; padding all to
`max_length` wastes compute on short texts. Buckets bound the number of programs (one per bucket) and keep most of
the saving:

    tok = TextBatcher(tm.load_tokenizer(path), max_length=128)          # buckets (32, 64, 128)
    batch = tok([{"text": "a dog", "label": 3}, ...])                    # input_ids, attention_mask, labels

A text longer than `max_length` tokens is truncated (counted in `truncated`, reported by the pipeline benchmark).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


def default_buckets(max_length: int) -> tuple[int, ...]:
    """max_length / 4, / 2 and max_length itself, rounded up to multiples of 8 (at least 8)."""
    return tuple(sorted({max(8, -(-max_length // d // 8) * 8) for d in (4, 2)} | {max_length}))


@dataclass
class TextBatcher:
    """Record list -> model batch: tokenise together (fast tokenizers batch in Rust), pad to the smallest bucket.

    Attributes:
      tokenizer: a transformers tokenizer (`tm.load_tokenizer(checkpoint)`).
      max_length: truncation length in tokens, specials included; must fit the model's position table.
      buckets: padded lengths (ascending, the last equal to max_length); default `default_buckets(max_length)`.
    """

    tokenizer: object
    max_length: int = 128
    buckets: tuple[int, ...] = ()
    truncated: int = field(default=0, compare=False)  # texts cut at max_length so far (this process)

    def __post_init__(self):
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        self.buckets = tuple(self.buckets) or default_buckets(self.max_length)
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[-1] != self.max_length:
            raise ValueError(f"buckets must ascend and end at max_length={self.max_length}, got {self.buckets}")

    def bucket(self, length: int) -> int:
        """The padded length of a batch whose longest sequence has `length` tokens."""
        return next(b for b in self.buckets if b >= length)

    def __call__(self, records: Sequence[Mapping]) -> dict[str, np.ndarray]:
        texts = [r["text"] for r in records]
        # one token over the limit shows which texts were cut, without tokenising whole long documents
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"]
        self.truncated += sum(len(ids) > self.max_length for ids in enc)
        ids = [_truncate(x, self.max_length, self.tokenizer) for x in enc]
        width = self.bucket(max(len(x) for x in ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = np.full((len(ids), width), pad, np.int32)
        mask = np.zeros((len(ids), width), np.int32)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)], mask[i, : len(x)] = x, 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if records and "label" in records[0]:
            out["labels"] = np.asarray([r["label"] for r in records], np.int32)
        return out


def _truncate(ids: list[int], max_length: int, tokenizer) -> list[int]:
    """Keeps the first max_length - 1 tokens and the final special token ([SEP] / </s>): what HF truncation at
    max_length gives."""
    if len(ids) <= max_length:
        return ids
    last = ids[-1] if ids[-1] in tokenizer.all_special_ids else None
    return ids[: max_length - 1] + [last] if last is not None else ids[:max_length]
