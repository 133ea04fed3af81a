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


def _is_repo_id(name: str) -> bool:
    """huggingface_hub's own rule ("bert-base-uncased" and "google/vit-base-patch16-224" are both hub ids)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


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
    if path.exists() or not _is_repo_id(str(name_or_path)):
        raise CheckpointError(
            f"checkpoint folder {path.absolute()} does not exist (and {str(name_or_path)!r} is not a valid hub id). "
            "Pass an existing folder holding config.json and model.safetensors, or a hub id like "
            "'bert-base-uncased' or 'org/model'."
        )
    try:
        return _from_hub(str(name_or_path), revision, allow_pickle)
    except CheckpointError as e:
        raise CheckpointError(
            f"no local folder {path.absolute()}, so {name_or_path!r} was taken for a hub id: {e}"
        ) from e


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


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file; a damaged one (an interrupted copy) is a CheckpointError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the file is damaged; fetch or save it again") from e


def read_config_dict(folder: Path) -> dict:
    """The raw `config.json` as a dict."""
    return read_json(folder / "config.json")


def read_state_dict(folder: Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in `folder` as numpy arrays keyed by their PyTorch names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_safetensors([single])
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
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
    out = {}
    for file in files:
        out.update(read_safetensors_file(file))
    return out


def read_safetensors_file(file: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file; a truncated or corrupted file is an error that names it."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ... : the library's messages do not name the file
        raise CheckpointError(
            f"cannot read {file}: {type(e).__name__}: {e}. The file is truncated or corrupted (an interrupted "
            "download or copy?): fetch or save it again."
        ) from e


def _read_pickle(files: list[Path]) -> dict[str, np.ndarray]:
    import torch  # only needed for the opt-in pickle path

    out = {}
    for file in files:
        sd = torch.load(file, map_location="cpu", weights_only=True)
        out.update({k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()})
    return out
