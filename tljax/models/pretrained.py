"""`load_pretrained` / `save_pretrained`: HF checkpoint folders <-> (linen module, parameter pytree).

Merging is strict: every checkpoint tensor lands in the model or is reported as ignored on purpose, every model
variable comes from the checkpoint or is re-initialised because a pattern (or a new head) says so. Anything
else is a `CheckpointError` that names the key and says what to do.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax import tree
from tljax.models import families, head_io, hub
from tljax.models.heads import WithHead
from tljax.models.hub import CheckpointError


@dataclass
class LoadReport:
    """What happened to every tensor: loaded, re-initialised, ignored (checkpoint keys), adapted (resampled)."""

    source: str
    model_type: str
    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    num_params: int = 0

    def __str__(self) -> str:
        lines = [
            f"load report for {self.source} ({self.model_type}, {self.num_params:,} parameters)",
            f"  loaded         {len(self.loaded):5d} tensors",
        ]
        for title, items in [("re-initialised", self.reinitialized), ("ignored", self.ignored)]:
            lines.append(f"  {title:14s} {len(items):5d} " + ("" if not items else _preview(items)))
        lines += [f"  adapted        {p}: {note}" for p, note in self.adapted.items()]
        return "\n".join(lines)


def _preview(items: Sequence[str], n: int = 6) -> str:
    more = f", ... (+{len(items) - n})" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"


@dataclass(frozen=True)
class Pretrained:
    """A loaded model: `model.apply(loaded.variables, ...)`; `variables` = params plus BatchNorm statistics."""

    model: nn.Module
    params: dict
    state: dict  # non-trainable collections, e.g. {"batch_stats": ...}; empty for most families
    report: LoadReport
    hf_config: Any
    family: ModuleType

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.state}


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | jnp.dtype = "float32",
    param_dtype: str | jnp.dtype | None = None,
    head: nn.Module | None = None,
    num_classes: int | None = None,
    pooling: str | None = None,
    reinit: Iterable[str] = (),
    ignore: Iterable[str] = (),
    allow_pickle: bool = False,
    revision: str | None = None,
    seed: int = 0,
    verbose: bool = False,
    num_layers: int | None = None,
    **family_options,
) -> Pretrained:
    """Loads an HF checkpoint into a tljax linen model.

    Heads: with `num_classes` (or `head=`) the model is `WithHead(backbone, head)` with params `backbone/...` and
    `head/...`. A head the checkpoint holds is loaded, never silently replaced: a folder written by
    `save_pretrained` (its `tljax_head` config entry) or a transformers classification checkpoint
    (BertForSequenceClassification, RobertaForSequenceClassification, ViTForImageClassification,
    ResNetForImageClassification). Its class count, layout and pooling must match the request (pooling defaults to
    the one it was trained on), else `CheckpointError`; `reinit=[r"^head/"]` starts a new head instead. Without head
    arguments, a folder written by `save_pretrained` comes back with its head; an HF classification checkpoint
    gives the backbone, its classifier reported as ignored.

    Args:
      name_or_path: local HF folder (config.json + model.safetensors) or hub id such as "bert-base-uncased" or
        "google/vit-base-patch16-224" (hub cache; honours HF_HUB_OFFLINE).
      dtype: compute dtype ("float32" or "bfloat16"). param_dtype: parameter dtype (defaults to `dtype`).
      head: a head module attached over pooled features (`WithHead`; params split into backbone/ and head/).
      num_classes: shorthand for `head=ClassificationHead(num_classes)` (a positive int).
      pooling: features for the head: "cls", "mean", "pooler", ... (checkpoint head's or family default).
      reinit: regexes over parameter paths to initialise fresh instead of loading (each must match).
      ignore: regexes over checkpoint keys to drop on purpose (each must match).
      allow_pickle: permit `pytorch_model.bin` (unpickling runs code; safetensors needs no opt-in).
      num_layers: keep the first n blocks (transformers' `from_pretrained(..., num_hidden_layers=n)`): the deeper
        blocks' tensors are reported as ignored and `hf_config` says n, so `save_pretrained` writes a consistent
        shallower checkpoint. Fine-tuning from an intermediate layer; BERT-family and ViT.
      family_options: passed to the family's `build` (e.g. `image_size=384` for ViT).

    Returns:
      `Pretrained(model, params, state, report, hf_config, family)`; `.variables` for `model.apply`.
    """
    folder = hub.resolve(name_or_path, revision=revision, allow_pickle=allow_pickle)
    raw_config = hub.read_config_dict(folder)
    fam = families.family(raw_config.get("model_type"))
    hf_config = _hf_config(folder)
    state_dict = _normalise_keys(hub.read_state_dict(folder, allow_pickle=allow_pickle), fam.PREFIXES)
    dropped = []
    if num_layers is not None:
        hf_config, dropped = keep_blocks(fam, hf_config, state_dict, num_layers)
        state_dict = {k: v for k, v in state_dict.items() if k not in set(dropped)}
    reinit_res, ignore_res = _compile("reinit", reinit), _compile("ignore", ignore)
    new_head = any(r.search("head/out/kernel") for r in reinit_res)
    found = head_io.find(folder, raw_config, fam, hf_config, state_dict)
    backbone, dtypes = families.build(
        fam, hf_config, dtype, param_dtype, checkpoint_keys=set(state_dict), **family_options
    )
    head, pooling = head_io.requested(head, num_classes, pooling, found, fam, new_head, **dtypes)
    model = WithHead(backbone, head, pooling) if head is not None else backbone
    take_head = head is not None and found is not None and not new_head
    if take_head:
        head_io.check_pooling(found, pooling)
    checkpoint_head = (found.tensors, found.sources) if take_head else ({}, {})
    variables, report = _merge(
        model, fam, hf_config, state_dict, checkpoint_head, str(name_or_path), reinit_res, ignore_res, seed,
        prefix="backbone/" if head is not None else "",
    )  # fmt: skip
    if found is not None and not take_head:
        report.ignored = sorted(report.ignored + found.keys)
    report.ignored = sorted(report.ignored + dropped)
    if verbose:
        print(report)
    variables = tree.unflatten(variables)
    params = variables.pop("params")
    loaded = Pretrained(model, params, variables, report, hf_config, fam)
    from tljax.peft import export as peft_export  # tljax.peft builds on this module

    if (folder / peft_export.CONFIG_FILE).is_file():  # adapters / prompts saved beside the base weights
        loaded = peft_export.attach(loaded, folder)
    return loaded


def keep_blocks(fam: ModuleType, hf_config, state_dict: Mapping[str, Any], n) -> tuple[Any, list[str]]:
    """(config of the first n blocks, checkpoint keys of the blocks above them)."""
    total = fam.num_layers(hf_config)
    if not hasattr(fam, "with_num_layers"):
        supported = sorted(t for t, m in families.FAMILIES.items() if hasattr(m, "with_num_layers"))
        raise ValueError(f"num_layers is not supported for model_type {hf_config.model_type!r}; it is for {supported}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"num_layers={n!r}: the checkpoint has {total} blocks; keep 1 to {total} (None: all)")
    above = [re.compile(fam.block_regex(i)) for i in range(n, total)]
    keymap = fam.key_map(hf_config)

    def is_above(key: str) -> bool:
        path = keymap.flax_path(key)
        return path is not None and any(r.search(_collection_free(path)) for r in above)

    return fam.with_num_layers(hf_config, n), sorted(k for k in state_dict if is_above(k))


def _hf_config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _normalise_keys(state_dict: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> dict[str, np.ndarray]:
    """Strips base-model prefixes (`bert.` of *ForXxx checkpoints) and renames legacy LayerNorm gamma/beta."""
    out = {}
    for key, value in state_dict.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                break
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        out[key] = value
    return out


def _collection_free(path: str) -> str:
    return path.split("/", 1)[1]


def _merge(model, fam, hf_config, state_dict, head, source, reinit_res, ignore_res, seed, prefix):
    """Checkpoint tensors (plus `head` = (tensors, their source keys) of a checkpoint head) -> model variables."""
    head_tensors, head_sources = head
    dummy = fam.dummy_inputs(hf_config)
    rngs = {"params": jax.random.key(seed)}
    shapes = tree.flatten(jax.eval_shape(lambda: model.init(rngs, **dummy)))
    keymap = fam.key_map(hf_config)
    converted, src = keymap.to_flax(state_dict)
    converted = {_add_prefix(p, prefix): v for p, v in converted.items()}
    src = {_add_prefix(p, prefix): k for p, k in src.items()}
    converted.update(head_tensors)
    src.update(head_sources)
    report = LoadReport(
        source,
        hf_config.model_type,
        num_params=tree.count({p: s for p, s in shapes.items() if p.startswith("params/")}),
    )
    if hasattr(fam, "adapt"):
        report.adapted = fam.adapt(converted, shapes, hf_config, prefix)
    report.ignored = _check_unexpected(keymap.unmapped(state_dict), converted, src, shapes, fam.IGNORE, ignore_res)
    to_init = _to_reinit(shapes, converted, src, reinit_res, prefix, has_head=bool(head_tensors))
    _check_patterns_used("ignore", ignore_res, state_dict)
    _check_ignore_unused(ignore_res, sorted(src[p] for p in converted if p in shapes and p not in to_init))
    _check_patterns_used("reinit", reinit_res, [_collection_free(p) for p in shapes])
    out = {p: jnp.asarray(converted[p], dtype=shapes[p].dtype) for p in shapes if p not in to_init}
    out.update(init_only(model, dummy, rngs, to_init))
    report.loaded = sorted(p for p in out if p not in to_init)
    report.reinitialized = sorted(to_init)
    return out, report


def _add_prefix(path: str, prefix: str) -> str:
    collection, rest = path.split("/", 1)
    return f"{collection}/{prefix}{rest}"


def _compile(what: str, patterns: Iterable[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise TypeError(f"{what} takes a list of regexes, got the string {patterns!r}; wrap it: [{patterns!r}]")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise CheckpointError(f"{what}=: invalid regex {p!r}: {e}") from e
    return out


def _check_patterns_used(what: str, regexes: list[re.Pattern], names: Iterable[str]) -> None:
    names = list(names)
    unused = [r.pattern for r in regexes if not any(r.search(n) for n in names)]
    if unused:
        target = "checkpoint key" if what == "ignore" else "model parameter path"
        raise CheckpointError(f"{what} pattern(s) {unused} match no {target}; fix the regex (examples: {names[:3]}).")


def _check_ignore_unused(regexes: list[re.Pattern], used: list[str]) -> None:
    """`ignore` drops checkpoint tensors that have no place in the model; one that matches a tensor the model loads
    would silently load it anyway."""
    hits = {r.pattern: [k for k in used if r.search(k)] for r in regexes}
    named = ", ".join(f"'{p}': {_preview(keys, 3)}" for p, keys in hits.items() if keys)
    if named:
        raise CheckpointError(
            f"ignore pattern(s) match checkpoint tensors the model loads: {named}. "
            "ignore= only drops tensors with no place in the model; to start those parameters afresh, pass "
            "reinit=[regex over model parameter paths] instead."
        )


def _check_unexpected(unmapped, converted, src, shapes, family_ignore, user_ignore) -> list[str]:
    """Checkpoint keys that land nowhere: ignored when a pattern says so, else an error."""
    stray = list(unmapped) + [src[p] for p in converted if p not in shapes]
    ignored = [k for k in stray if any(re.search(r, k) for r in family_ignore) or any(r.search(k) for r in user_ignore)]
    unexpected = [k for k in stray if k not in ignored]
    if unexpected:
        raise CheckpointError(
            f"{len(unexpected)} checkpoint tensor(s) have no place in the model: {_preview(unexpected, 10)}. "
            "Either the config does not match the weights, or these belong to a head the model does not have; "
            "pass ignore=[regex, ...] to drop them on purpose (or reinit=[r'^head/'] for a new head)."
        )
    return sorted(ignored)


def _to_reinit(shapes, converted, src, reinit_res, prefix, has_head: bool) -> list[str]:
    """Model variables to initialise fresh: a new head (the checkpoint has none), reinit patterns; missing or
    mis-shaped ones are errors."""
    to_init, missing = [], []
    for path, shape in shapes.items():
        name = _collection_free(path)
        is_head = bool(prefix) and name.startswith("head/")
        if (is_head and not has_head) or any(r.search(name) for r in reinit_res):
            to_init.append(path)
        elif path not in converted:
            missing.append(name)
        elif converted[path].shape != shape.shape and is_head:
            got, want = tuple(converted[path].shape), tuple(shape.shape)
            classes = f" ({got[-1]} classes, {want[-1]} requested)" if name.endswith("out/bias") else ""
            raise CheckpointError(
                f"the checkpoint's head does not match the requested one{classes}: {src[path]!r} has shape {got} "
                f"but {name!r} expects {want}; {head_io.NEW_HEAD}"
            )
        elif converted[path].shape != shape.shape:
            raise CheckpointError(
                f"shape mismatch: checkpoint tensor {src[path]!r} has shape {tuple(converted[path].shape)} but "
                f"model parameter {name!r} expects {tuple(shape.shape)}. config.json does not describe these "
                f"weights, or the layer changed on purpose: then pass reinit=[{re.escape(name)!r}]."
            )
    if missing:
        raise CheckpointError(
            f"{len(missing)} model parameter(s) are not in the checkpoint: {_preview(missing, 10)}. Pass "
            "reinit=[regex, ...] to initialise them fresh (e.g. reinit=[r'^head/'] for a new head), or check that "
            "config.json matches."
        )
    return to_init


def init_only(model, dummy, rngs, paths: list[str]) -> dict[str, jax.Array]:
    """Fresh initial values of only `paths`: under jit, XLA drops the initialisers of everything else."""
    if not paths:
        return {}
    init = jax.jit(lambda r: {p: v for p, v in tree.flatten(model.init(r, **dummy)).items() if p in paths})
    return init(rngs)


def save_pretrained(
    folder: str | os.PathLike,
    loaded: Pretrained,
    *,
    params: Mapping | None = None,
    state: Mapping | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
    merge: bool = True,
) -> Path:
    """Writes the model as an HF folder (config.json + model.safetensors with HF key names) that
    `load_pretrained(folder)` turns back into the same model, head included.

    A classification head that a transformers class shares (BERT and RoBERTa sequence classification, ViT and
    ResNet image classification, with that class's pooling) is written in the class's key names with
    `architectures` and `num_labels`, so the class loads the folder with the same logits; any other head goes to
    `tljax_head.safetensors` in Flax names. The folder appears atomically (written beside it, then renamed): a
    crash never leaves a half-written one, and an overwritten folder is replaced only once the new one is complete.

    Args:
      folder: destination; must not exist unless `overwrite=True`.
      loaded: the `Pretrained` that `load_pretrained` returned (gives family, config and structure).
      params, state: fine-tuned values to save instead of `loaded.params` / `loaded.state`.
      label_names: class names, written as config.json `id2label` / `label2id`.
      merge: a PEFT model (`tljax.peft.apply`) has its LoRA factors folded into the base kernels (transformers then
        loads the folder); adapters and prompts, which no kernel can absorb, and LoRA with `merge=False` are written
        beside the base weights (`tljax_peft.*`), which `load_pretrained` reads back (transformers ignores them).
    """
    from safetensors.numpy import save_file

    from tljax.peft import core as peft_core
    from tljax.peft import export as peft_export

    unmerged = ((), {})
    if peft_core.methods_of(loaded):
        loaded, *unmerged = peft_export.split(loaded, params, merge)
        params = loaded.params

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    flat = tree.flatten(
        {"params": params if params is not None else loaded.params, **(state if state is not None else loaded.state)}
    )
    flat = {p: np.asarray(jnp.asarray(v, jnp.float32) if v.dtype == jnp.bfloat16 else v) for p, v in flat.items()}
    head = {p: v for p, v in flat.items() if _collection_free(p).startswith("head/")}
    body = {p.replace("/backbone/", "/", 1): v for p, v in flat.items() if p not in head}
    tensors, head_file, config = head_io.export(loaded.hf_config, loaded.family, loaded.model, body, head, label_names)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if head_file:
            save_file(head_file, str(tmp / head_io.HEAD_FILE), metadata={"format": "flax"})
        if unmerged[0]:
            peft_export.write(tmp, *unmerged)
        _replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _replace(new: Path, folder: Path) -> None:
    """Moves `new` to `folder`; an existing `folder` is renamed aside first and deleted only after the move."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    os.replace(folder, old / folder.name)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
