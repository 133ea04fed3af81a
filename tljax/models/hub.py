"""Find a Hugging Face checkpoint folder (local or in the hub cache) and read its config and tensors.

Safetensors is the default; pickled `pytorch_model.bin` files run arbitrary code when loaded, so they are read
only when the caller opts in with `allow_pickle=True`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model"]


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read or merged into the model; the message says how to fix it."""


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep + os.sep in name


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """Returns a local folder holding `config.json` and the weights.

    Args:
      name_or_path: a local folder, or a hub id such as `"google/vit-base-patch16-224"` resolved through
        huggingface_hub's cache (downloaded when online; cache only when `HF_HUB_OFFLINE=1`).
      revision: hub branch, tag or commit.
      allow_pickle: also fetch `pytorch_model.bin` for hub repos without safetensors.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} has no config.json: point to a Hugging Face model folder "
                "(config.json plus model.safetensors), e.g. one written by save_pretrained."
            )
        return path
    if _looks_like_path(str(name_or_path)) or path.exists():
        raise CheckpointError(
            f"checkpoint folder {path} does not exist. Pass an existing folder holding "
            "config.json and model.safetensors, or a hub id like 'org/model'."
        )
    return _from_hub(str(name_or_path), revision, allow_pickle)


def _from_hub(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
    patterns = WEIGHT_PATTERNS + (["pytorch_model*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"hub id {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{'HF_HUB_OFFLINE=1 is set' if offline else 'the hub cannot be reached'}. Download it once on a "
            "machine with network (huggingface-cli download " + repo_id + "), copy the cache, or pass a local "
            "folder."
        ) from e
    except Exception as e:  # network errors, missing repos, gated repos
        raise CheckpointError(
            f"could not fetch hub id {repo_id!r}: {e}. Check the id, your network and HF_TOKEN, or pass a local folder."
        ) from e


def read_config_dict(folder: Path) -> dict:
    """The raw `config.json` as a dict."""
    with open(folder / "config.json") as f:
        return json.load(f)


def read_state_dict(folder: Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in `folder` as numpy arrays keyed by their PyTorch names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_safetensors([single])
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _read_safetensors([folder / s for s in shards])
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins and not allow_pickle:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({bins[0].name}); unpickling can run arbitrary code, so it "
            "needs opt-in: pass allow_pickle=True, or convert the folder to model.safetensors."
        )
    if bins:
        return _read_pickle(bins)
    raise CheckpointError(
        f"{folder} has no model.safetensors (nor model.safetensors.index.json, nor "
        "pytorch_model.bin): it is not a weights folder."
    )


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _read_pickle(files: list[Path]) -> dict[str, np.ndarray]:
    import torch  # only needed for the opt-in pickle path

    out = {}
    for file in files:
        sd = torch.load(file, map_location="cpu", weights_only=True)
        out.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()})
    return out
