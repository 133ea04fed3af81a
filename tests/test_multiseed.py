"""K runs of a schedule as one vmapped program (`tljax.multiseed`) equal K separate `engine.fit` runs: seeds that
differ in data order and dropout, learning rates as a per-run input, frozen parameters kept once and untouched."""

import jax
import numpy as np
import pytest
from engine_driver import SEQ, token_dropout, token_split

import tljax.models as tm
from tljax import engine, freezing, multiseed, tree
from tljax.data import EvalData, TrainData
from tljax.engine import EngineConfig

# one worker runs this module under `pytest -n 2 --dist loadgroup`: its module fixtures (whole runs) are built once
pytestmark = pytest.mark.xdist_group("test_multiseed")

SEEDS = (0, 1, 2)
OPTIMIZER = {"weight_decay": 0.01}
# Not bitwise: vmapping batches the runs' matmuls and reductions (one (K*B, ...) dot against shared weights, batched
# dots against per-run ones), so XLA sums in another order and float32 results differ in the last bits (~1e-7).
# Adam divides by the root of the squared gradients, so parameters whose true gradient is ~0 (BERT's attention key
# bias: softmax ignores it) turn rounding noise into full-size steps: measured max |diff| 1.4e-7 here, 5e-6 with
# LP-FT's full fine-tune. 1e-5 (the engine's layout tolerance) is far below what one step changes (~1e-3).
ATOL = 1e-5


@pytest.fixture(scope="module")
def loaded(tiny_bert_dir):
    return tm.load_pretrained(tiny_bert_dir, num_classes=3, pooling="mean")  # dropout 0.1: seeds draw masks


def to_example(record):
    return {
        "input_ids": record["input_ids"],
        "attention_mask": np.ones(SEQ, np.int32),
        "labels": np.int32(record["label"]),
    }


def train_data(seed):
    return TrainData(token_split(), batch_size=8, seed=seed, random_transform=token_dropout, threads=1, prefetch=2)


def eval_data():
    return EvalData(token_split(), batch_size=16, transform=to_example, threads=1)()


def head_then_top(loaded):
    """Two phases: the head alone (3 steps), then the head and the top block (3 steps, its Adam state carried
    over). The embeddings and the lower block stay frozen throughout: the runs share one copy of them. (Cheaper to
    compile than LP-FT's full fine-tune, with the same phase boundary.)"""
    return freezing.get("keras_recipe", loaded, head_steps=3, finetune_steps=3, lr=1e-2, top_n=1, lr_div=10)


@pytest.fixture(scope="module")
def vmapped(loaded, compilation_cache):
    return multiseed.fit_seeds(
        loaded, head_then_top(loaded), train_data, SEEDS, optimizer=OPTIMIZER, eval_data=eval_data
    )


@pytest.fixture(scope="module")
def separate(loaded, compilation_cache):
    def fit(seed):
        config = EngineConfig(seed=seed, devices=1, progress=False, optimizer=OPTIMIZER)
        return engine.fit(loaded, head_then_top(loaded), train_data(seed), config, eval_data=eval_data)

    return [fit(seed) for seed in SEEDS]


def max_diff(a: dict, b: dict) -> float:
    a, b = tree.flatten(jax.device_get(a)), tree.flatten(jax.device_get(b))
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.asarray(a[p], np.float64) - np.asarray(b[p], np.float64)))) for p in a)


def test_vmapped_seeds_equal_separate_engine_runs(vmapped, separate):
    for k, ref in enumerate(separate):
        assert max_diff(vmapped.params(k), ref.state.params) < ATOL
        for mine, theirs in zip(vmapped.history, ref.history, strict=True):
            assert (mine.name, mine.start, mine.stop) == (theirs.name, theirs.start, theirs.end)
            np.testing.assert_allclose(mine.metrics[k]["loss"], theirs.metrics["loss"], atol=ATOL)
        for phase, metrics in ref.phase_evals().items():
            np.testing.assert_allclose(vmapped.phase_evals(k)[phase]["loss"], metrics["loss"], atol=ATOL)
            assert vmapped.phase_evals(k)[phase]["accuracy"] == metrics["accuracy"]
    assert vmapped.diverged == [None] * len(SEEDS)


def test_seeds_differ_in_data_order_and_dropout(vmapped, loaded):
    losses = vmapped.metrics["loss"]  # (K, steps)
    assert losses.shape == (len(SEEDS), 6)
    np.testing.assert_allclose(losses[:, 0], losses[0, 0])  # zero head: every run starts at log(3)
    assert all(np.abs(losses[i, 1:] - losses[j, 1:]).max() > 1e-3 for i in range(3) for j in range(i))
    assert max_diff(vmapped.params(0), vmapped.params(1)) > 1e-4


def test_frozen_parameters_are_kept_once_and_untouched(vmapped, loaded):
    head_phase, top_phase = vmapped.history
    flat = tree.flatten(loaded.params)
    head = {p for p in flat if p.startswith("head/")}
    top = {p for p in flat if p.startswith("backbone/encoder/layer_1/")}
    assert head_phase.per_run_params == tree.count([flat[p] for p in head])
    assert top_phase.per_run_params == top_phase.trainable_params == tree.count([flat[p] for p in head | top])
    # the embeddings, the lower block and the pooler (mean pooling never reaches it) never train: one copy for all
    # runs, the loaded arrays themselves; the rest is K copies
    assert set(vmapped.trained) == head | top and set(vmapped.shared) == set(flat) - head - top
    assert all(vmapped.shared[p] is flat[p] for p in vmapped.shared)
    assert all(v.shape == (len(SEEDS), *flat[p].shape) for p, v in vmapped.trained.items())


def test_learning_rate_scales_equal_scaled_learning_rates(loaded, vmapped):
    # `vmapped` only orders the tests: it compiled this K=3 head-only program (same partition, LR and weight decay
    # as its first phase; scales are always a step input), so the persistent cache serves it here
    probe = freezing.get("linear_probe", loaded, steps=3, lr=1e-2)
    runs = multiseed.fit_seeds(
        loaded, probe, train_data, [0, 0, 0], optimizer=OPTIMIZER, learning_rate_scales=[0.5, 0, 1]
    )
    slow = freezing.get("linear_probe", loaded, steps=3, lr=5e-3)
    ref = engine.fit(loaded, slow, train_data(0), EngineConfig(devices=1, progress=False, optimizer=OPTIMIZER))
    assert max_diff(runs.params(0), ref.state.params) < ATOL
    assert max_diff(runs.params(1), loaded.params) == 0.0  # scale 0: no update, weight decay included
    assert max_diff(runs.params(2), runs.params(0)) > 1e-3
    # a linear probe trains the head only: the backbone stays one shared copy, the loaded arrays themselves
    loaded_flat = tree.flatten(loaded.params)
    assert set(runs.trained) == {p for p in loaded_flat if p.startswith("head/")}
    assert all(runs.shared[p] is loaded_flat[p] for p in runs.shared)


def test_bad_arguments(loaded):
    with pytest.raises(ValueError, match="learning_rate_scales has 1 entries for 2 seeds"):
        multiseed.fit_seeds(loaded, head_then_top(loaded), train_data, [0, 1], learning_rate_scales=[1.0])
    with pytest.raises(ValueError, match="at least one seed"):
        multiseed.fit_seeds(loaded, head_then_top(loaded), train_data, [])
