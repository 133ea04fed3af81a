"""What the task's loss reaches: unused parameters stay frozen and bitwise unchanged, BatchNorm of frozen layers runs
in inference mode, accumulation carries no gradients for frozen parameters, soft labels."""

import itertools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import save_tiny, token_batch

import tljax.models as tm
from tljax import engine, freezing, rules, task, tree
from tljax import partition as P
from tljax.engine import EngineConfig
from tljax.losses import classification_loss
from tljax.step import init_state, make_train_step


def text_batches(start=0):
    for i in itertools.count(start):
        ids, mask = token_batch(4, 8, seed=i)
        yield {"input_ids": ids, "attention_mask": mask, "labels": np.array([i % 3, 1, 2, 0])}


def image_batches(start=0, size=32):
    for i in itertools.count(start):
        rng = np.random.RandomState(i)
        yield {"pixel_values": rng.randn(4, 3, size, size).astype(np.float32), "labels": rng.randint(0, 3, 4)}


def fit(loaded, sched, data, **cfg):
    cfg = {"devices": 1, "progress": False, "optimizer": {"weight_decay": 0.1}, **cfg}
    return engine.fit(loaded, sched, data, EngineConfig(**cfg))


def perturb_head(loaded):
    """A non-zero head, so gradients reach the backbone (the new head starts at zero)."""
    import dataclasses

    params = jax.tree.map(lambda x: x, loaded.params)
    params["head"]["out"]["kernel"] = jnp.full_like(params["head"]["out"]["kernel"], 0.1)
    return dataclasses.replace(loaded, params=params)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32)
    cfg = CLIPConfig(
        text_config=dict(text, max_position_embeddings=16), vision_config=dict(vision, patch_size=8), projection_dim=16
    )
    return save_tiny(tmp_path_factory.mktemp("clip"), CLIPModel(cfg))


@pytest.fixture(scope="module")
def tiny_resnet_dir(tmp_path_factory):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]))
    for m in model.modules():  # non-trivial statistics, so "unchanged" means something
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return save_tiny(tmp_path_factory.mktemp("resnet"), model.eval())


def test_bert_mean_pooling_leaves_the_pooler_unused(tiny_bert_dir):
    mean = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="mean")
    batch = next(text_batches())
    unused = task.unused_params(mean.model, mean.params, batch)
    assert unused == {p for p in tree.paths(mean.params) if p.startswith("backbone/pooler/")}
    pooled = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="pooler")
    assert task.unused_params(pooled.model, pooled.params, batch) == frozenset()


def test_clip_image_classifier_leaves_the_text_tower_unused(tiny_clip_dir):
    loaded = tm.load_pretrained(tiny_clip_dir, num_classes=3)  # head on image_embeds
    unused = task.unused_params(loaded.model, loaded.params, next(image_batches()))
    expected = {
        p
        for p in tree.paths(loaded.params)
        if p.startswith(("backbone/text/", "backbone/text_projection/")) or p == "backbone/logit_scale"
    }
    assert unused == expected and len(expected) > 20


def test_unused_parameters_stay_bitwise_unchanged_under_full_fine_tuning(tiny_clip_dir):
    """Regression: the `full` rule set applied AdamW weight decay to CLIP's text tower and logit_scale, which the
    image-classification loss never reaches."""
    loaded = perturb_head(tm.load_pretrained(tiny_clip_dir, num_classes=3))
    result = fit(loaded, freezing.get("full", loaded, steps=2, lr=1e-2), image_batches)
    before, after = tree.flatten(loaded.params), tree.flatten(result.state.params)
    unused = {p for g in result.plan.phases[0].partition.groups if g.state == "unused" for p in g.paths}
    assert "backbone/logit_scale" in unused and "backbone/text/final_norm/scale" in unused
    for p in before:
        assert np.array_equal(before[p], after[p]) == (p in unused), p
    assert result.history[0].opt_state_bytes == 2 * result.plan.phases[0].partition.nbytes("train")
    assert "unused by the loss" in result.plan.phases[0].partition.summary()


def test_unused_paths_are_frozen_whatever_the_rules_say(tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="mean")
    unused = {p for p in tree.paths(loaded.params) if "pooler" in p}
    part = P.build(loaded.params, rules.full(loaded), learning_rate=1e-3, weight_decay=0.1, unused=unused)
    mask = tree.flatten(part.trainable_mask)
    assert all(not mask[p] for p in unused) and sum(mask.values()) == len(mask) - len(unused)
    assert [r["state"] for r in part.rows()][-1] == "unused" and part.count("unused") == 32 * 32 + 32
    with pytest.raises(ValueError, match="not parameters"):
        P.build(loaded.params, rules.full(loaded), learning_rate=1e-3, unused={"backbone/nope"})


def _stats(tree_):
    return {p: np.asarray(v) for p, v in tree.flatten(tree_).items()}


def test_frozen_batchnorm_runs_in_inference_mode_per_phase(tiny_resnet_dir):
    """keras_recipe on ResNet: in the head phase every BatchNorm keeps its statistics; once the top stage thaws, its
    statistics update from the pretrained ones while the frozen stages' stay as loaded."""
    loaded = tm.load_pretrained(tiny_resnet_dir, num_classes=3)
    sched = freezing.get("keras_recipe", loaded, head_steps=2, finetune_steps=2, top_n=1)
    head = fit(loaded, freezing.FreezingSchedule(sched.phases[:1]), image_batches)
    both = fit(loaded, sched, image_batches)
    start, after_head, after_top = (_stats(s) for s in (loaded.state, head.state.collections, both.state.collections))
    assert all(np.array_equal(start[p], after_head[p]) for p in start)
    for p in start:
        thawed = p.startswith("batch_stats/backbone/stage_3/")
        assert np.array_equal(start[p], after_top[p]) != thawed, p


def test_frozen_batchnorm_train_mode_keeps_the_old_behaviour(tiny_resnet_dir):
    loaded = tm.load_pretrained(tiny_resnet_dir, num_classes=3)
    sched = freezing.get("linear_probe", loaded, steps=1)
    result = fit(loaded, sched, image_batches, frozen_batchnorm="train")
    start, after = _stats(loaded.state), _stats(result.state.collections)
    assert not any(np.array_equal(start[p], after[p]) for p in start if p.endswith("/mean"))
    with pytest.raises(ValueError, match="frozen_batchnorm must be one of"):
        fit(loaded, sched, image_batches, frozen_batchnorm="eval")


def _scan_carry_elements(closed) -> int:
    """Elements carried by the (first) scan in a jaxpr, searching inside nested jaxprs."""
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive.name == "scan":
            consts = eqn.params["num_consts"]
            carry = eqn.invars[consts : consts + eqn.params["num_carry"]]
            return sum(int(np.prod(v.aval.shape)) for v in carry)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found = _scan_carry_elements(jax.extend.core.ClosedJaxpr(sub, ()))
            if found:
                return found
    return 0


def test_accumulation_carries_no_gradients_for_frozen_params(tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="pooler")
    part = P.build(loaded.params, rules.linear_probe(loaded), learning_rate=1e-3)
    step = make_train_step(loaded.model, part, accumulate=2)
    closed = jax.make_jaxpr(step)(init_state(loaded.params, part.tx), next(text_batches()))
    carried = _scan_carry_elements(closed)
    assert 0 < carried <= tree.count(loaded.params["head"]) + 8  # the head's gradient sum, not 20k parameters


def test_soft_labels_equal_one_hot_labels():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    hard = classification_loss({"logits": logits}, {"labels": jnp.array([0, 2])})
    soft = classification_loss({"logits": logits}, {"labels": jax.nn.one_hot(jnp.array([0, 2]), 3)})
    assert float(hard[0]) == pytest.approx(float(soft[0])) and float(hard[1]["accuracy"]) == 1.0
    with pytest.raises(ValueError, match="soft labels have 4 columns but the model has 3 classes"):
        task.check_labels({"labels": np.zeros((2, 4), np.float32)}, 3)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        task.check_labels({"labels": np.array(["cat", "dog"])}, 3)
