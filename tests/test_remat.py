"""Gradient checkpointing (`remat` family option): same parameters, outputs and gradients; less kept for backward."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import token_batch

import tljax.models as tm
from tljax import partition, peft, rules, task
from tljax.models import bert, clip, vit
from tljax.models.scratch import hf_config_of
from tljax.step import init_state, make_train_step

TINY = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=20)
BERT = {"model_type": "bert", "vocab_size": 50, "hidden_dropout_prob": 0.2, **TINY}


def _batch():
    ids, mask = token_batch(4, 7, vocab=50)
    return {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 1, 2, 1])}


def _loaded(remat: str, methods=()):
    loaded = tm.from_config(BERT, num_classes=3, seed=0, remat=remat)
    return peft.apply(loaded, [peft.from_config(m) for m in methods]) if methods else loaded


def _one_step(loaded, rule_set: str):
    """Loss, metrics and updated params after one training step (dropout on: the RNG must match too)."""
    batch = _batch()
    part = partition.build(loaded.params, rules.get(rule_set, loaded), learning_rate=1e-2,
                           unused=task.unused_params(loaded.model, loaded.params, batch))  # fmt: skip
    step = jax.jit(make_train_step(loaded.model, part))
    state, metrics = step(init_state(loaded.params, part.tx), batch)
    return metrics, state.params


@pytest.mark.parametrize("policy", ["block", "dots"])
@pytest.mark.parametrize("methods, rule_set", [((), "full"), (({"method": "lora", "rank": 2},), "peft")])
def test_same_params_outputs_and_training_step(policy, methods, rule_set):
    plain, remat = _loaded("none", methods), _loaded(policy, methods)
    inner = lambda m: getattr(m.model.backbone, "inner", m.model.backbone)  # PEFT wraps the backbone
    assert inner(remat).remat == policy and inner(plain).remat == "none"
    jax.tree.map(np.testing.assert_array_equal, plain.params, remat.params)  # same paths, same init
    inputs = {k: v for k, v in _batch().items() if k != "labels"}
    out = lambda m: m.model.apply(m.variables, **inputs)["logits"]
    np.testing.assert_allclose(out(remat), out(plain), atol=1e-6)
    (m0, p0), (m1, p1) = _one_step(plain, rule_set), _one_step(remat, rule_set)
    assert float(m0["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-6)
    assert float(m0["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p0, p1)


def test_remat_keeps_less_for_the_backward_pass():
    """What the backward pass keeps (the residuals in `jax.vjp`'s closure): every activation without remat, the
    block inputs with "block", the projection outputs too with "dots". (XLA's CPU compiler may recompute less than
    asked; on GPU/TPU this is what the step holds: README, "PEFT".)"""
    cfg = {**BERT, "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 256, "hidden_dropout_prob": 0.0}
    ids = np.ones((16, 64), np.int32)

    def kept_bytes(remat: str) -> int:
        loaded = tm.from_config(cfg, num_classes=3, seed=0, remat=remat)
        _, vjp = jax.vjp(lambda p: loaded.model.apply({"params": p}, input_ids=ids, attention_mask=ids)["logits"],
                         loaded.params)  # fmt: skip
        return sum(x.nbytes for x in jax.tree.leaves(vjp))

    none, block, dots = kept_bytes("none"), kept_bytes("block"), kept_bytes("dots")
    assert block < 0.1 * none and block < dots < 0.5 * none, (none, block, dots)


def test_compiled_step_memory_falls_with_remat_under_tljax_compiler_options():
    """The compiled train step's temporaries shrink with remat="block" when it is compiled as the engine compiles
    it (`parallel.compiler_options()`: memory-optimised scheduling on CPU). Under XLA:CPU's own concurrency-first
    scheduler ({}) the recomputation is hoisted and nothing is saved, which is why tljax sets the option."""
    from tljax import parallel

    cfg = {**BERT, "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 256, "hidden_dropout_prob": 0.0}
    ids = np.ones((16, 64), np.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "labels": np.zeros(16, np.int32)}

    def temp_bytes(remat: str, options) -> int:
        loaded = tm.from_config(cfg, num_classes=3, seed=0, remat=remat)
        part = partition.build(loaded.params, rules.full(loaded), learning_rate=1e-3)
        step = parallel.StepByShape(jax.jit(make_train_step(loaded.model, part)).lower, options=options)
        return step.prepare(init_state(loaded.params, part.tx), batch).memory_analysis().temp_size_in_bytes

    tljax_none, tljax_block = temp_bytes("none", None), temp_bytes("block", None)
    assert tljax_block < 0.7 * tljax_none, (tljax_none, tljax_block)  # measured 18.9 vs 30.9 MB
    if jax.devices()[0].platform == "cpu":
        assert parallel.compiler_options() == parallel.CPU_COMPILER_OPTIONS
        assert temp_bytes("block", {}) > 0.95 * temp_bytes("none", {})  # XLA:CPU's default keeps it all (35.2 MB)
    assert parallel.compiler_options({}) is None and parallel.compiler_options({"a": 1}) == {"a": 1}


def test_every_family_takes_the_option_and_bad_values_fail():
    from transformers import CLIPConfig, ViTConfig

    assert vit.build(ViTConfig(**TINY, image_size=16, patch_size=8), remat="dots").remat == "dots"
    text, vision = dict(TINY, vocab_size=50), dict(TINY, image_size=16, patch_size=8)
    c = clip.build(CLIPConfig(text_config=text, vision_config=vision), remat="block")
    assert c.vision.remat == c.text.remat == "block"
    with pytest.raises(ValueError, match=r"remat must be one of \['block', 'dots', 'none'\], got 'full'"):
        bert.build(hf_config_of(BERT), remat="full")


def test_job_config_reaches_the_model(tiny_bert_dir):
    import ml_collections

    from tljax.job.build import load_model

    cfg = ml_collections.ConfigDict({"name": tiny_bert_dir, "options": {"remat": "block"}})
    assert load_model(cfg, num_classes=3).model.backbone.remat == "block"
