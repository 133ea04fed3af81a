"""PEFT models in checkpoint folders: LoRA is merged into the base kernels (an ordinary HF folder that transformers
loads), methods that add computation (adapters, prompts) are written beside the base weights
(`tljax_peft.json` + `tljax_peft.safetensors`), and `load_pretrained` weaves them back in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from tljax import tree
from tljax.peft import core

CONFIG_FILE = "tljax_peft.json"
WEIGHTS_FILE = "tljax_peft.safetensors"


def merge(loaded, params=None):
    """`loaded` with its LoRA factors folded into the base kernels (`W + alpha/r A B`): a plain model whose outputs
    equal the unmerged one's (to float rounding), ready for `save_pretrained` and transformers. Methods that cannot be
    merged (adapters, prompts) are an error here; `save_pretrained` keeps those unmerged instead."""
    methods = core.methods_of(loaded)
    if not methods:
        raise ValueError("merge: the model has no PEFT methods (nothing to merge)")
    kept = [m.KIND for m in methods if not m.MERGEABLE]
    if kept:
        raise ValueError(
            f"merge: {kept} add layers no kernel can absorb; save the model with save_pretrained (it merges LoRA and "
            "writes the rest beside the base weights, and load_pretrained restores them)"
        )
    return split(loaded, params)[0]


def split(loaded, params=None, merge: bool = True):
    """(`loaded` with mergeable methods merged (all kept with `merge=False`) and the others removed, the removed
    methods, their parameters)."""
    methods = core.methods_of(loaded)
    flat = tree.flatten(loaded.params if params is None else params)
    for m in methods:
        if m.MERGEABLE and merge:
            flat = m.merge(flat)
    kept = tuple(m for m in methods if not (m.MERGEABLE and merge))
    names = {n for m in kept for n in m.PARAMS}
    extra = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] in names}
    base = {p: v for p, v in flat.items() if p not in extra}
    model = core.with_backbone(loaded.model, core.backbone(loaded.model).inner)
    return dataclasses.replace(loaded, model=model, params=tree.unflatten(base)), kept, extra


def write(folder: Path, methods, tensors: dict) -> None:
    """The unmerged methods' config and parameters (Flax paths) into `folder`."""
    from safetensors.numpy import save_file

    config = {"methods": [m.to_config() for m in methods]}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({p: np.asarray(v, np.float32) for p, v in tensors.items()}, str(folder / WEIGHTS_FILE))


def attach(loaded, folder: Path):
    """`loaded` with the methods `folder` records woven in and their saved parameters."""
    from tljax.models.hub import CheckpointError, read_safetensors_file
    from tljax.peft import from_config

    config = json.loads((folder / CONFIG_FILE).read_text())
    woven = core.apply(loaded, [from_config(c) for c in config["methods"]])
    saved = read_safetensors_file(folder / WEIGHTS_FILE)
    flat = tree.flatten(woven.params)
    added = set(core.added_paths(woven))
    if set(saved) != added:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {sorted(added - set(saved))[:4]}, "
            f"unexpected {sorted(set(saved) - added)[:4]}; the folder is damaged, export it again"
        )
    for p, v in saved.items():
        if tuple(v.shape) != tuple(flat[p].shape):
            want = tuple(flat[p].shape)
            raise CheckpointError(f"{p} has shape {tuple(v.shape)} in {WEIGHTS_FILE}, the model expects {want}")
        flat[p] = np.asarray(v).astype(flat[p].dtype)
    return dataclasses.replace(woven, params=tree.unflatten(flat))
