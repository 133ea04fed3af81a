"""Domain-shift pairs with one label space, for domain adaptation and robustness work.

    source, target = domain_pair("wordnet", "train")        # definitions -> usage sentences
    source, target = domain_pair("fashion_mnist_c", "test", corruption="zigzag", severity=3)

`wordnet`: WordNet noun definitions (`wordnet_lexnames`) -> usage sentences of the same kinds of synsets
(`wordnet_examples`); a shift of style and length with the same 26 classes (and a class-balance shift: plants and
animals are common among definitions, rare among examples).

`fashion_mnist_c`: clean Fashion-MNIST -> the same distribution corrupted as in MNIST-C (`corruptions.CORRUPTIONS`).
For the train split the two domains are disjoint halves of Fashion-MNIST's train set (a seeded, stratified
halving), so an adaptation method never sees a target image's clean twin; for the test split both are the full test
set, clean and corrupted.
"""

from __future__ import annotations

import numpy as np

from tljax.data import sources
from tljax.data.corruptions import corrupted
from tljax.data.records import Split
from tljax.data.splits import subsample

PAIRS = {
    "wordnet": "wordnet_lexnames -> wordnet_examples (26 classes)",
    "fashion_mnist_c": "fashion_mnist clean -> corrupted (10 classes)",
}


def domain_pair(
    name: str, split: str, *, corruption: str = "gaussian_noise", severity: int = 3, seed: int = 0
) -> tuple[Split, Split]:
    """(source, target) splits of a registered domain-shift pair (see the module docstring)."""
    if name == "wordnet":
        return sources.load("wordnet_lexnames", split), sources.load("wordnet_examples", split)
    if name == "fashion_mnist_c":
        clean = sources.load("fashion_mnist", split)
        if split == "train":
            half = subsample(clean, len(clean) // 2, seed).records.indices
            rest = np.setdiff1d(np.arange(len(clean)), half)
            target = clean.take(rest, f"half1@{seed}")
            return clean.take(half, f"half0@{seed}"), corrupted(target, corruption, severity, seed)
        return clean, corrupted(clean, corruption, severity, seed)
    raise ValueError(f"unknown domain-shift pair {name!r}; pairs: {PAIRS}")
