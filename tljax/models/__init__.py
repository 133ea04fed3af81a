"""Pretrained model zoo: linen modules per family and HF checkpoint loading/export."""

from tljax.models.families import FAMILIES, family
from tljax.models.heads import ClassificationHead, MultiHead, WithHead, mean_pool, pool
from tljax.models.hub import CheckpointError
from tljax.models.pretrained import LoadReport, Pretrained, load_pretrained, save_pretrained
from tljax.models.scratch import from_config


def load_tokenizer(name_or_path, **kwargs):
    """The HF tokenizer stored with a checkpoint (local folder or cached hub id)."""
    from transformers import AutoTokenizer

    from tljax.models.hub import resolve

    return AutoTokenizer.from_pretrained(resolve(name_or_path), **kwargs)


__all__ = [
    "FAMILIES",
    "CheckpointError",
    "ClassificationHead",
    "LoadReport",
    "MultiHead",
    "Pretrained",
    "WithHead",
    "family",
    "from_config",
    "load_pretrained",
    "load_tokenizer",
    "mean_pool",
    "pool",
    "save_pretrained",
]
