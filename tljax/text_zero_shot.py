"""Zero-shot text classification with a sentence encoder: each text goes to the class whose name embeds nearest.

    tokenizer = tm.load_tokenizer(folder)                                   # e.g. all-MiniLM-L6-v2
    names = text_zero_shot.label_words(split.label_names)                  # "noun.animal" -> "animal"
    classes = text_zero_shot.class_embeddings(loaded, tokenizer, names)    # (C, D) unit vectors, TEMPLATES ensembled
    texts = text_zero_shot.embed(loaded, tokenizer, [r["text"] for r in split])   # (N, D) unit vectors
    predicted = text_zero_shot.predict(texts, classes)                     # argmax cosine similarity

Sentence-transformers models such as all-MiniLM-L6-v2 embed a text as the mean of its token states (padding
excluded), L2-normalised; cosine similarity of these embeddings is what they were trained for (Reimers & Gurevych
2019), so class names put into a few templates are a classifier without training. Prompt ensembling is CLIP's
(`tljax.zero_shot`, whose `prompts` this module shares): per class, the mean of its normalised prompt embeddings,
normalised again. Embeddings come from `tljax.features.extract`, so texts already extracted for probes or few-shot
episodes are the same vectors after `normalize` when the class prompts are embedded with the same pooling and
layer (`class_embeddings(..., pooling=feats.pooling, layer=feats.layer)`; the defaults: "mean", final layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tljax import features
from tljax.data.pipeline import EvalData
from tljax.data.text import TextBatcher
from tljax.zero_shot import prompts

# "{}" is the class word. Written for dictionary definitions (WordNet glosses), whose topic the word names.
TEMPLATES = ("{}", "a word about {}", "a kind of {}", "something related to {}", "a definition of a {} word")


def label_words(label_names: Sequence[str]) -> list[str]:
    """Label names as words a text encoder knows: a dotted prefix dropped ("noun.animal" -> "animal", WordNet's
    lexicographer files), underscores as spaces, lower case ("noun.Tops" -> "tops")."""
    return [name.rsplit(".", 1)[-1].replace("_", " ").lower() for name in label_names]


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (the sentence-transformers `Normalize` module)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed(
    loaded,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 256,
    pooling: str = "mean",
    layer: int | None = None,
) -> np.ndarray:
    """(N, D) unit embeddings of `texts`: the backbone's final output pooled (mean over real tokens), normalised.

    Args:
      loaded: a text `Pretrained` (a `WithHead` model contributes its backbone).
      tokenizer: the checkpoint's tokenizer (`tljax.models.load_tokenizer`).
      max_length: truncation in tokens; batches pad to multiples of 8 up to it.
      pooling, layer: as in `tljax.features.extract` (default: mean over the final output, the sentence embedding);
        give those of the texts' features when class vectors are compared with features extracted otherwise.
    """
    if not len(texts):
        raise ValueError("embed needs at least one text")
    buckets = tuple(range(8, max_length, 8)) + (max_length,)
    batches = EvalData([{"text": t} for t in texts], batch_size=min(batch_size, len(texts)),
                       collate=TextBatcher(tokenizer, max_length, buckets))  # fmt: skip
    return normalize(features.extract(loaded, batches(), layer=layer, pooling=pooling).x)


def class_embeddings(
    loaded, tokenizer, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES, **embed_options
) -> np.ndarray:
    """(C, D) unit class vectors: every template filled with every class name, embedded, ensembled per class.
    `embed_options` go to `embed` (max_length, batch_size, pooling, layer): score against texts pooled the same way."""
    emb = embed(loaded, tokenizer, prompts(class_names, templates), **embed_options)
    return normalize(emb.reshape(len(class_names), len(templates), -1).mean(axis=1))


def scores(text_embeds: np.ndarray, class_embeds: np.ndarray) -> np.ndarray:
    """(N, C) cosine similarities (both sides normalised here, so raw pooled features are fine too)."""
    text_embeds, class_embeds = normalize(text_embeds), normalize(class_embeds)
    if text_embeds.shape[-1] != class_embeds.shape[-1]:
        raise ValueError(f"text embeddings have {text_embeds.shape[-1]} features, classes {class_embeds.shape[-1]}")
    return text_embeds @ class_embeds.T


def predict(text_embeds: np.ndarray, class_embeds: np.ndarray) -> np.ndarray:
    """(N,) index of the most similar class per text."""
    return scores(text_embeds, class_embeds).argmax(-1)
