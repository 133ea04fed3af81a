"""CLIP zero-shot classification: class embeddings from class-name prompts, images scored against them.

    tokenizer = zero_shot.load_tokenizer("openai/clip-vit-base-patch32")
    weights = zero_shot.class_embeddings(loaded, tokenizer, ["t-shirt", "trouser", ...])    # (C, D), TEMPLATES
    report = zero_shot.zero_shot_evaluate(loaded, weights, eval_batches, label_names=names)  # EvalReport
    preds = zero_shot.zero_shot_predict(loaded, weights, batches)                             # Predictions

Prompt ensembling (Radford et al. 2021, section 3.1.4): each class name is put into every template, each prompt's
text embedding is L2-normalised, the class's embeddings are averaged and the mean normalised again. The logits of
an image are `exp(logit_scale) * image_embeds . class_embeds`, HF `CLIPModel`'s `logits_per_image` against these
fixed class embeddings.

Scoring reuses `tljax.evaluation`: the class embeddings become the weights of a head (`ZeroShotHead`) over the
backbone's `image_embeds`, so metrics, masks of padded batches, per-class accuracy and predictions follow exactly
the conventions of every other evaluation in tljax. `classifier` returns that model, e.g. to start fine-tuning
from the zero-shot head as WiSE-FT / FLYP do.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import tljax.models as tm
from tljax import evaluation
from tljax.features import backbone_of
from tljax.models import clip, hub
from tljax.models.heads import WithHead

# A few of the 80 ImageNet templates of CLIP's prompt-engineering notebook
# (github.com/openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb), chosen for small, centred, often
# grayscale product photos such as Fashion-MNIST's. "{}" is replaced by the class name.
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a photo of the {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a fast tokenizer, or a BPE vocabulary (+ merges.txt)


# --- checkpoint and tokenizer ---


def text_tower(loaded) -> tuple[clip.CLIPModel, dict]:
    """(CLIPModel, its variables) of a plain CLIP model or of a `WithHead` over one; other models are an error."""
    module, variables = backbone_of(loaded)
    if not isinstance(module, clip.CLIPModel) or module.text is None:
        kind = getattr(loaded.hf_config, "model_type", type(module).__name__)
        raise ValueError(
            f"zero-shot classification needs a CLIP checkpoint with both towers (model_type 'clip', HF CLIPModel); "
            f"this one is {kind!r}" + (" (vision tower only)" if isinstance(module, clip.CLIPModel) else "")
        )
    return module, variables


def load_tokenizer(name_or_path: str | os.PathLike):
    """The CLIP tokenizer stored with a checkpoint (local folder or cached hub id).

    Raises:
      CheckpointError: the folder holds no tokenizer files. (transformers would otherwise build an empty CLIP
        tokenizer from config.json alone, which maps every word to one unknown token without a warning.)
    """
    folder = hub.resolve(name_or_path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise tm.CheckpointError(
            f"{name_or_path} has no tokenizer ({' or '.join(TOKENIZER_FILES)} + merges.txt): zero-shot prompts need "
            "the checkpoint's own CLIP tokenizer; save it into the folder with tokenizer.save_pretrained(folder)"
        )
    return tm.load_tokenizer(folder)


def prompts(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every template filled with every class name, class-major: C * T strings."""
    if not class_names or not templates:
        raise ValueError(f"need at least one class name and one template, got {len(class_names)} and {len(templates)}")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ValueError(f"templates must hold '{{}}' where the class name goes: {missing}")
    return [t.format(name) for name in class_names for t in templates]


def tokenize(module: clip.CLIPModel, tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Token ids and mask padded to the text tower's length, so every batch has one shape (one compilation).

    Raises:
      ValueError: ids outside the tower's vocabulary, or rows the tower would not pool at their end-of-text token:
        the tokenizer is not this checkpoint's.
    """
    length = module.text.max_positions
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    if ids.shape[1] != length or ids.max() >= module.text.vocab_size:
        raise ValueError(
            f"the tokenizer gives ids up to {ids.max()} in rows of {ids.shape[1]}, but the text tower has "
            f"vocab_size={module.text.vocab_size} and {length} positions: is it this checkpoint's tokenizer?"
        )
    eos = np.argmax(ids == tokenizer.eos_token_id, axis=-1)
    if not np.array_equal(np.asarray(module.text.eos_index(ids)), eos):
        raise ValueError(
            f"the text tower (eos_token_id={module.text.eos_token_id}) would not pool at the tokenizer's end-of-text "
            f"token {tokenizer.eos_token!r} (id {tokenizer.eos_token_id}): tokenizer and checkpoint do not match"
        )
    return {"input_ids": ids, "attention_mask": mask}


# --- text embeddings ---


@functools.partial(jax.jit, static_argnames="module")
def _text_embeds(variables, input_ids, attention_mask, *, module):
    """Projected, L2-normalised text embeddings (the vision tower is not run)."""
    out = module.apply(variables, input_ids=input_ids, attention_mask=attention_mask)
    return out["text_embeds"].astype(jnp.float32)


def embed_prompts(loaded, tokenizer, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
    """(N, D) unit text embeddings of `texts`, `batch_size` prompts per jitted call (the last batch padded)."""
    module, variables = text_tower(loaded)
    tokens = tokenize(module, tokenizer, texts)
    n = len(texts)
    rows = min(batch_size, n)
    out = []
    for start in range(0, n, rows):
        take = np.minimum(np.arange(start, start + rows), n - 1)  # repeat the last prompt to fill the batch
        emb = _text_embeds(variables, tokens["input_ids"][take], tokens["attention_mask"][take], module=module)
        out.append(np.asarray(emb)[: n - start])
    return np.concatenate(out)


def class_embeddings(
    loaded, tokenizer, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES, *, batch_size: int = 256
) -> np.ndarray:
    """Zero-shot class weights by prompt ensembling.

    Args:
      loaded: `load_pretrained` of a CLIP checkpoint (a `WithHead` model contributes its backbone).
      tokenizer: the checkpoint's tokenizer (`load_tokenizer`).
      class_names: one name per class, in label order (e.g. "t-shirt" rather than the label "T-shirt/top").
      templates: prompts with "{}" for the class name (default `TEMPLATES`).
      batch_size: prompts per call of the text tower.
    Returns:
      (C, D) float32 unit vectors: per class, the mean of its normalised prompt embeddings, normalised again.
    """
    texts = prompts(class_names, templates)
    emb = embed_prompts(loaded, tokenizer, texts, batch_size=batch_size)
    emb = emb.reshape(len(class_names), len(templates), -1)
    return np.asarray(clip.zero_shot_classifier(emb), np.float32)


# --- scoring images ---


class ZeroShotHead(nn.Module):
    """`exp(logit_scale) * normalise(features) . class_embeds^T`: CLIP's zero-shot classifier as a head over
    `image_embeds`. Params `class_embeds` (C, D) and `logit_scale` (the checkpoint's log-scale, a copy)."""

    num_classes: int

    @nn.compact
    def __call__(self, features, *, train: bool = False):
        weights = self.param("class_embeds", nn.initializers.zeros, (self.num_classes, features.shape[-1]))
        logit_scale = self.param("logit_scale", nn.initializers.zeros, ())
        return clip.zero_shot_logits(features, weights, logit_scale)


def classifier(loaded, class_embeds) -> tm.Pretrained:
    """`loaded`'s CLIP backbone with a `ZeroShotHead` holding `class_embeds` (C, D), pooling "image_embeds": a
    `Pretrained` that `evaluation.evaluate` / `predict` (and fine-tuning) take like any classifier."""
    module, variables = text_tower(loaded)
    class_embeds = np.asarray(class_embeds, np.float32)
    dim = module.projection_dim
    if class_embeds.ndim != 2 or class_embeds.shape[1] != dim:
        raise ValueError(f"class_embeds must be (classes, {dim}) for this model, got shape {class_embeds.shape}")
    backbone = variables.pop("params")
    head = {"class_embeds": class_embeds, "logit_scale": backbone["logit_scale"]}
    model = WithHead(module, ZeroShotHead(len(class_embeds)), pooling="image_embeds")
    state = {k: {"backbone": v} for k, v in variables.items()}
    return dataclasses.replace(loaded, model=model, params={"backbone": backbone, "head": head}, state=state)


def zero_shot_predict(
    loaded,
    class_embeds,
    image_batches: Iterable[Mapping],
    *,
    label_names: Sequence[str] | None = None,
    top_k: int = 5,
    mesh: Mesh | None = None,
) -> evaluation.Predictions:
    """Zero-shot logits (N, C) of the example rows of `image_batches` (`pixel_values`, optional `labels` and
    `mask`), with probabilities and top-k as `evaluation.predict` returns them (`.logits`, `.labels`, ...)."""
    model = classifier(loaded, class_embeds)
    return evaluation.predict(model, image_batches, label_names=label_names, top_k=top_k, mesh=mesh)


def zero_shot_evaluate(
    loaded,
    class_embeds,
    image_batches: Iterable[Mapping],
    *,
    label_names: Sequence[str] | None = None,
    mesh: Mesh | None = None,
) -> evaluation.EvalReport:
    """`evaluation.evaluate_detailed` of the zero-shot classifier: `.metrics` (accuracy, loss, top-k, macro F1,
    ECE), `.per_class_accuracy`, `.confusion`; rows whose `mask` is 0 are not counted."""
    model = classifier(loaded, class_embeds)
    return evaluation.evaluate_detailed(model, image_batches, label_names=label_names, mesh=mesh)
