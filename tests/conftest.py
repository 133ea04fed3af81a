"""Shared fixtures: tiny random HF checkpoints written with `save_pretrained` to temp folders (session-scoped)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def save_tiny(folder, hf_model) -> str:
    """Writes a PyTorch HF model as a checkpoint folder and returns its path."""
    hf_model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny_bert"), BertModel(cfg).eval())


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory):
    import torch
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(1)
    cfg = RobertaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=1,
        hidden_act="gelu_new",
    )
    return save_tiny(tmp_path_factory.mktemp("tiny_roberta"), RobertaModel(cfg).eval())


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for one test module (runs that differ by seed or data compile the same
    programs: the second compiles nothing), then the settings as they were. Yields the cache directory."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    from tljax import engine

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip
    before = {n: getattr(jax.config, n) for n in names}
    path = engine.enable_compilation_cache(str(tmp_path_factory.mktemp("jax_cache")))
    yield path
    for n, value in before.items():
        jax.config.update(n, value)
    cc.reset_cache()


@pytest.fixture(scope="session")
def planted_hub(tmp_path_factory):
    """A Hugging Face cache holding tiny stand-ins for the hub ids README and the configs use."""
    from hub_stand_ins import plant_all

    return plant_all(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def hub_cache(planted_hub, monkeypatch):
    """Points huggingface_hub at the planted cache, offline, for one test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(planted_hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return planted_hub


def token_batch(batch: int, length: int, vocab: int = 99, seed: int = 0, pad_id: int = 0):
    """Random ids with ragged right padding (row i keeps at least 1 token)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(pad_id + 2, vocab, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for i in range(1, batch):
        keep = max(1, length - i * max(1, length // batch))
        mask[i, keep:] = 0
        ids[i, keep:] = pad_id
    return ids, mask


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
