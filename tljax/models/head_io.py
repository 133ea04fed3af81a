"""Task heads in checkpoint folders, so a fine-tuned classifier survives save -> load (and loads in transformers).

A head that one of transformers' classification classes shares (`HfClassifier` of the family: BERT, RoBERTa, ViT,
ResNet) is written in that class's key names, with `architectures` and `num_labels` in config.json, so
`BertForSequenceClassification.from_pretrained(folder)` gives the same logits. Any other head (another pooling,
`MultiHead`, CLIP) goes to `tljax_head.safetensors` in Flax paths. Either way config.json records the head under
`tljax_head` (kind, num_classes, hidden, dropout, pooling), and `load_pretrained(folder)` rebuilds it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tljax.models.convert import HfClassifier
from tljax.models.heads import ClassificationHead, check_num_classes, head_spec
from tljax.models.hub import CheckpointError, read_safetensors_file

HEAD_FILE = "tljax_head.safetensors"
SPEC_KEY = "tljax_head"
NEW_HEAD = "pass reinit=[r'^head/'] to start a new head (the checkpoint's head is then reported as ignored)"


@dataclass
class CheckpointHead:
    """A head found in a checkpoint folder: its tensors under `params/head/...` and where they came from."""

    tensors: dict[str, np.ndarray]
    keys: list[str]  # the checkpoint keys (or head-file paths) they came from, for the load report
    sources: dict[str, str]  # flax path -> the key it came from, for error messages
    spec: dict | None = None  # the `tljax_head` entry of config.json, if tljax wrote the folder
    hf: HfClassifier | None = None  # set when the tensors are a transformers class's classifier
    where: str = field(default="")

    def describe(self) -> str:
        if self.hf is not None:
            return f"the {self.hf.architecture} classifier ({', '.join(self.keys)})"
        return f"the head in {self.where}"


def find(folder: Path, raw_config: dict, fam, hf_config, state_dict: dict) -> CheckpointHead | None:
    """The checkpoint's head, if any; HF classifier keys it takes are removed from `state_dict`."""
    spec = raw_config.get(SPEC_KEY)
    if (folder / HEAD_FILE).is_file():
        tensors = read_safetensors_file(folder / HEAD_FILE)
        return CheckpointHead(tensors, sorted(tensors), {p: p for p in tensors}, spec, where=str(folder / HEAD_FILE))
    hf = fam.classifier(hf_config) if hasattr(fam, "classifier") else None
    keys = [r.torch for r in hf.rules] if hf else []
    if not hf or not all(k in state_dict for k in keys):
        return None
    tensors, sources = hf.key_map.to_flax({k: state_dict.pop(k) for k in keys})
    return CheckpointHead(tensors, keys, sources, spec, hf)


def requested(head, num_classes, pooling, found: CheckpointHead | None, fam, new_head: bool, **dtypes):
    """(head module or None, pooling): what the caller asked for, completed from the checkpoint's head.

    No head arguments and a tljax-written head -> that head again; `num_classes` -> a `ClassificationHead` with the
    checkpoint head's layout (e.g. RoBERTa's hidden dense); pooling defaults to the one the checkpoint head saw.
    """
    if num_classes is not None:
        check_num_classes(num_classes)
    spec = found.spec if found is not None else None
    known = found if found is not None and not new_head else None
    if head is None and num_classes is None:
        if not (spec and found is not None):
            return None, pooling or fam.DEFAULT_POOLING
        if spec.get("kind") != "classification":
            raise CheckpointError(
                f"this folder holds a custom head ({spec.get('module')}): pass head=<the same module> to load it"
            )
        num_classes = spec["num_classes"]
    if head is None:
        hidden, dropout = _layout(known)
        head = ClassificationHead(num_classes, hidden=hidden, dropout=dropout, **dtypes)
    if pooling is None:
        pooling = _saved_pooling(known) or fam.DEFAULT_POOLING
    return head, pooling


def _layout(found: CheckpointHead | None) -> tuple[int, float]:
    if found is None:
        return 0, 0.0
    if found.spec and found.spec.get("kind") == "classification":
        return found.spec["hidden"], found.spec["dropout"]
    return (found.hf.hidden, 0.0) if found.hf else (0, 0.0)


def _saved_pooling(found: CheckpointHead | None) -> str | None:
    if found is None:
        return None
    return (found.spec or {}).get("pooling") or (found.hf.pooling if found.hf else None)


def check_pooling(found: CheckpointHead, pooling: str) -> None:
    """A checkpoint head trained on other features than the requested pooling would predict garbage."""
    saved = _saved_pooling(found)
    if saved is not None and saved != pooling:
        raise CheckpointError(
            f"{found.describe()} was trained on pooling={saved!r} features, but pooling={pooling!r} was requested: "
            f"load with pooling={saved!r}, or {NEW_HEAD}"
        )


def export(cfg, fam, model, body: dict, head: dict, label_names=None) -> tuple[dict, dict, object]:
    """(torch tensors for model.safetensors, tensors for tljax_head.safetensors, config to write).

    `body` and `head` are flat Flax variables (`params/...`); `cfg` is not modified (a copy is returned).
    """
    cfg = copy.deepcopy(cfg)
    spec = head_spec(model) if head else None
    tensors = fam.key_map(cfg).to_torch(body)
    hf = fam.classifier(cfg) if spec and hasattr(fam, "classifier") else None
    if spec is not None:
        setattr(cfg, SPEC_KEY, spec)
    elif hasattr(cfg, SPEC_KEY):
        delattr(cfg, SPEC_KEY)
    if hf is not None and _matches(hf, spec, head):
        tensors = {hf.prefix + k: v for k, v in tensors.items()} | hf.key_map.to_torch(head)
        cfg.architectures = [hf.architecture]
        _set_labels(cfg, spec["num_classes"], label_names)
        return tensors, {}, cfg
    if any("For" in a for a in (getattr(cfg, "architectures", None) or [])):
        cfg.architectures = None  # the folder no longer has that class's layout
    if spec and spec["kind"] == "classification":
        _set_labels(cfg, spec["num_classes"], label_names)
    return tensors, head, cfg


def _matches(hf: HfClassifier, spec: dict, head: dict) -> bool:
    paths = {r.flax for r in hf.rules}
    return (
        spec["kind"] == "classification"
        and spec["pooling"] == hf.pooling
        and spec["hidden"] == hf.hidden
        and set(head) == paths
    )


def _set_labels(cfg, num_classes: int, label_names) -> None:
    if label_names is None:
        cfg.num_labels = num_classes
        return
    label_names = list(label_names)
    if len(label_names) != num_classes:
        raise ValueError(f"label_names has {len(label_names)} names but the head has {num_classes} classes")
    twice = sorted({str(n) for n in label_names if label_names.count(n) > 1})
    if twice:
        raise ValueError(f"label_names names {twice} more than once: label2id could not map each class back")
    cfg.id2label = dict(enumerate(label_names))
    cfg.label2id = {name: i for i, name in enumerate(label_names)}
