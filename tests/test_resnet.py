"""ResNet parity with transformers' PyTorch `ResNetModel`: eval and train-mode BatchNorm, frozen statistics, loading
a classification checkpoint and exporting back to HF."""

import copy
import re

import jax
import numpy as np
import pytest
import torch
from conftest import max_abs_diff, save_tiny

import tljax.models as tm
from tljax import tree
from tljax.models import resnet

TINY = dict(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1])
VARIANTS = {
    "bottleneck": dict(layer_type="bottleneck"),
    # Stride on the first 1x1 conv instead of the 3x3.
    "bottleneck_v1": dict(layer_type="bottleneck", downsample_in_bottleneck=True),
    # gelu: HF applies hidden_act in the stem and after each residual sum, but relu inside blocks.
    "basic": dict(layer_type="basic", downsample_in_first_stage=True, hidden_act="gelu"),
}


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm affine params and running stats; HF's init (identity BN) would hide mapping bugs."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def _tiny_model(cls, seed: int, **overrides):
    from transformers import ResNetConfig

    torch.manual_seed(seed)
    model = cls(ResNetConfig(**TINY, **overrides))
    _randomise_batchnorm(model)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (folder, torch reference, tljax Pretrained)."""
    from transformers import ResNetModel

    out = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        ref = _tiny_model(ResNetModel, i, **overrides)
        folder = save_tiny(tmp_path_factory.mktemp(f"tiny_resnet_{name}"), ref)
        out[name] = folder, ref, tm.load_pretrained(folder)
    return out


def _images(batch: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 3, size, size).astype(np.float32)


def _torch(ref, x):
    with torch.no_grad():
        return ref(pixel_values=torch.tensor(x))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_eval(checkpoints, variant, batch):
    _, ref, loaded = checkpoints[variant]
    x = _images(batch)
    out = loaded.model.apply(loaded.variables, pixel_values=x)
    want = _torch(ref, x)
    side = 1 if variant == "basic" else 2  # downsample_in_first_stage halves once more
    assert out["last_hidden_state"].shape == (batch, side, side, 32)  # NHWC; HF: NCHW
    assert out["pooler_output"].shape == (batch, 32)  # HF: (B, C, 1, 1)
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state.permute(0, 2, 3, 1)) <= 1e-4
    assert max_abs_diff(out["pooler_output"], want.pooler_output.flatten(1)) <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_count_and_layout(checkpoints, variant):
    _, ref, loaded = checkpoints[variant]
    buffers = sum(b.numel() for n, b in ref.named_buffers() if not n.endswith("num_batches_tracked"))
    assert tree.count(loaded.params) == sum(p.numel() for p in ref.parameters())
    assert tree.count(loaded.params) + tree.count(loaded.state) == sum(p.numel() for p in ref.parameters()) + buffers
    assert loaded.params["embedder"]["conv"]["kernel"].shape == (7, 7, 3, 8)  # HWIO
    assert loaded.params["stage_1"]["block_0"]["shortcut"]["conv"]["kernel"].shape == (1, 1, 8, 16)
    assert set(loaded.state) == {"batch_stats"}
    norms = [p for p in tree.paths(loaded.params) if re.search("norm/", p)]
    assert len(norms) == 2 * len([m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)])


@pytest.mark.parametrize("variant", ["bottleneck", "basic"])
def test_train_mode_batch_statistics(checkpoints, variant):
    """Batch-statistics forward and the updated running mean and (unbiased) running var match torch `.train()`.

    Regression: flax's `nn.BatchNorm` folded the biased batch variance into running_var (off by n/(n-1), 0.19 here).
    """
    _, ref, loaded = checkpoints[variant]
    x = _images(3, seed=1)
    before = {k for k in ref.state_dict() if k.endswith(("running_mean", "running_var"))}
    trained = copy.deepcopy(ref).train()
    want = _torch(trained, x)
    out, updates = loaded.model.apply(loaded.variables, pixel_values=x, train=True, mutable=["batch_stats"])
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state.permute(0, 2, 3, 1)) <= 1e-4
    assert max_abs_diff(out["pooler_output"], want.pooler_output.flatten(1)) <= 1e-4
    after = {k: v.numpy() for k, v in trained.state_dict().items() if k in before}
    expected, _ = loaded.family.key_map(loaded.hf_config).to_flax(after)
    got = tree.flatten({"batch_stats": updates["batch_stats"]})
    assert set(got) == set(expected)
    assert max(max_abs_diff(got[p], expected[p]) for p in got) <= 1e-5


def test_freeze_bn_stats(checkpoints):
    folder, _, loaded = checkpoints["bottleneck"]
    frozen = tm.load_pretrained(folder, freeze_bn_stats=True)
    x = _images(2)
    eval_out = loaded.model.apply(loaded.variables, pixel_values=x)["last_hidden_state"]
    train_out = frozen.model.apply(frozen.variables, pixel_values=x, train=True)[
        "last_hidden_state"
    ]  # no mutable needed
    assert max_abs_diff(train_out, eval_out) == 0.0
    batch_out, _ = loaded.model.apply(loaded.variables, pixel_values=x, train=True, mutable=["batch_stats"])
    assert max_abs_diff(batch_out["last_hidden_state"], eval_out) > 1e-2

    # Through a head: the option passes load_pretrained -> build, and the head trains with frozen statistics.
    headed = tm.load_pretrained(folder, num_classes=3, freeze_bn_stats=True)
    out = headed.model.apply(headed.variables, pixel_values=x, train=True, rngs={"dropout": jax.random.key(0)})
    assert max_abs_diff(out["features"], eval_out.mean(axis=(1, 2))) <= 1e-6
    assert out["logits"].shape == (2, 3)


def test_classification_checkpoint_loads(tmp_path):
    from transformers import ResNetForImageClassification

    ref = _tiny_model(ResNetForImageClassification, 7, num_labels=5)
    loaded = tm.load_pretrained(save_tiny(tmp_path / "cls", ref))
    assert loaded.report.ignored[:2] == ["classifier.1.bias", "classifier.1.weight"]
    assert all(k.startswith("classifier.") or k.endswith("num_batches_tracked") for k in loaded.report.ignored)
    x = _images(2)
    out = loaded.model.apply(loaded.variables, pixel_values=x)
    assert max_abs_diff(out["pooler_output"], _torch(ref.resnet, x).pooler_output.flatten(1)) <= 1e-4


def test_save_pretrained_round_trip_with_updated_stats(checkpoints, tmp_path):
    """Export after a train-mode step: params and the updated running statistics land in HF's ResNetModel."""
    from transformers import ResNetModel

    _, _, loaded = checkpoints["bottleneck_v1"]
    _, updates = loaded.model.apply(
        loaded.variables, pixel_values=_images(3, seed=2), train=True, mutable=["batch_stats"]
    )
    folder = tm.save_pretrained(tmp_path / "export", loaded, state=updates)
    back, info = ResNetModel.from_pretrained(folder, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(k.endswith("num_batches_tracked") for k in info["missing_keys"])  # not exported; unused in eval
    x = _images(2)
    ours = loaded.model.apply({"params": loaded.params, **updates}, pixel_values=x)
    want = _torch(back.eval(), x)
    assert max_abs_diff(ours["last_hidden_state"], want.last_hidden_state.permute(0, 2, 3, 1)) <= 1e-4
    assert max_abs_diff(ours["pooler_output"], want.pooler_output.flatten(1)) <= 1e-4


def test_layer_ids_and_block_regex(checkpoints):
    _, _, loaded = checkpoints["bottleneck"]
    n = resnet.num_layers(loaded.hf_config)
    assert n == 4 and resnet.feature_dim(loaded.hf_config) == 32
    paths = tree.paths(loaded.params)
    ids = {p: resnet.layer_id(p, n) for p in paths}
    assert ids["embedder/conv/kernel"] == 0 and ids["stage_2/block_1/conv_0/norm/scale"] == 3
    assert set(ids.values()) == {0, 1, 2, 3, 4}
    assert resnet.layer_id("head/out/kernel", n) == n + 1
    stage2 = [p for p in paths if re.search(resnet.block_regex(2), p)]
    assert stage2 and all(ids[p] == 3 for p in stage2)


def test_rejects_unsupported_config_and_bad_input(checkpoints):
    _, _, loaded = checkpoints["bottleneck"]
    cfg = copy.deepcopy(loaded.hf_config)
    cfg.hidden_act = "no_such_act"
    with pytest.raises(ValueError, match="no_such_act"):
        resnet.build(cfg)
    with pytest.raises(ValueError, match="NCHW"):
        loaded.model.apply(loaded.variables, pixel_values=np.zeros((1, 64, 64, 3), np.float32))
