"""ViT parity with transformers' PyTorch `ViTModel`, checkpoint variants, position-table resampling, export."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_abs_diff, save_tiny

import tljax.models as tm
from tljax import tree
from tljax.models import vit

TOL = 1e-4


def _config(**overrides):
    from transformers import ViTConfig

    kw = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
    )
    return ViTConfig(**{**kw, **overrides})


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    from transformers import ViTModel

    torch.manual_seed(0)
    return save_tiny(tmp_path_factory.mktemp("tiny_vit"), ViTModel(_config()).eval())


@pytest.fixture(scope="module")
def vit_pair(vit_dir):
    from transformers import ViTModel

    return tm.load_pretrained(vit_dir), ViTModel.from_pretrained(vit_dir).eval()


def _pixels(batch: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 3, h, w).astype(np.float32)


def _torch_out(ref, pixels, **kw):
    with torch.no_grad():
        return ref(pixel_values=torch.tensor(pixels), **kw)


@pytest.mark.parametrize("batch", [1, 3])
def test_vit_parity(vit_pair, batch):
    loaded, ref = vit_pair
    x = _pixels(batch, seed=batch)
    out = loaded.model.apply(loaded.variables, pixel_values=x)
    want = _torch_out(ref, x)
    assert out["last_hidden_state"].shape == (batch, 17, 32)
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state) <= TOL
    assert max_abs_diff(out["pooler_output"], want.pooler_output) <= TOL


def test_param_count_and_paths(vit_pair):
    loaded, ref = vit_pair
    assert tree.count(loaded.params) == sum(p.numel() for p in ref.parameters())
    paths = set(tree.paths(loaded.params))
    for p in [
        "embeddings/cls_token",
        "embeddings/position_embeddings",
        "embeddings/patch_embeddings/kernel",
        "encoder/layer_1/attention/query/kernel",
        "encoder/layer_0/attention_norm/scale",
        "encoder/layer_0/mlp/fc1/kernel",
        "final_norm/scale",
        "pooler/dense/kernel",
    ]:
        assert p in paths
    assert loaded.params["embeddings"]["patch_embeddings"]["kernel"].shape == (8, 8, 3, 32)  # HWIO
    assert not loaded.report.ignored and not loaded.report.adapted


def test_wrong_image_size_is_an_error(vit_pair):
    loaded, _ = vit_pair
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        loaded.model.apply(loaded.variables, pixel_values=_pixels(1, 48, 48))
    with pytest.raises(ValueError, match="3 channels"):
        loaded.model.apply(loaded.variables, pixel_values=np.zeros((1, 32, 32, 3), np.float32))
    # Regression: sizes below one patch reached the resampling and failed there with a ZeroDivisionError
    with pytest.raises(ValueError, match=r"input image size=\(4, 4\) is smaller than one 8x8 patch"):
        loaded.model.apply(loaded.variables, pixel_values=_pixels(1, 4, 4), interpolate_pos_encoding=True)
    for size in (4, 0, (32, 4)):
        with pytest.raises(ValueError, match=re.escape(f"image_size={size!r} is smaller than one 8x8 patch")):
            vit.build(_config(), image_size=size)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from transformers import ViTForImageClassification

    torch.manual_seed(1)
    model = ViTForImageClassification(_config(num_labels=5)).eval()
    return save_tiny(tmp_path_factory.mktemp("tiny_vit_cls"), model), model


def test_image_classification_checkpoint_loads(classifier_dir):
    folder, ref = classifier_dir
    loaded = tm.load_pretrained(folder)
    assert loaded.report.ignored == ["classifier.bias", "classifier.weight"]
    assert "pooler" not in loaded.params  # ViTForImageClassification has no pooler
    x = _pixels(2)
    out = loaded.model.apply(loaded.variables, pixel_values=x)
    assert "pooler_output" not in out
    assert max_abs_diff(out["last_hidden_state"], _torch_out(ref.vit, x).last_hidden_state) <= TOL


def test_with_head_classifies_from_cls_token(classifier_dir):
    folder, ref = classifier_dir
    loaded = tm.load_pretrained(folder, num_classes=5)
    head = {
        "out": {
            "kernel": jnp.asarray(ref.classifier.weight.detach().numpy().T),
            "bias": jnp.asarray(ref.classifier.bias.detach().numpy()),
        }
    }
    x = _pixels(2)
    logits = loaded.model.apply({"params": {**loaded.params, "head": head}}, pixel_values=x)["logits"]
    assert max_abs_diff(logits, _torch_out(ref, x).logits) <= TOL


def test_masked_image_modeling_checkpoint_ignores_mask_token_and_decoder(tmp_path):
    from transformers import ViTForMaskedImageModeling

    torch.manual_seed(2)
    folder = save_tiny(tmp_path / "mim", ViTForMaskedImageModeling(_config(encoder_stride=8)))
    report = tm.load_pretrained(folder).report
    assert "embeddings.mask_token" in report.ignored
    assert any(k.startswith("decoder.") for k in report.ignored)


@pytest.fixture(scope="module")
def vit_48(vit_dir):
    return tm.load_pretrained(vit_dir, image_size=48)


def test_position_table_resampled_like_hf_interpolate_pos_encoding(vit_48, vit_pair):
    _, ref = vit_pair
    path = "params/embeddings/position_embeddings"
    assert vit_48.report.adapted == {path: "resampled 4x4 -> 6x6"}
    assert vit_48.params["embeddings"]["position_embeddings"].shape == (1, 37, 32)
    assert vit_48.hf_config.image_size == 48
    x = _pixels(3, 48, 48)
    out = vit_48.model.apply(vit_48.variables, pixel_values=x)
    want = _torch_out(ref, x, interpolate_pos_encoding=True)
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state) <= TOL
    assert max_abs_diff(out["pooler_output"], want.pooler_output) <= TOL


@pytest.mark.parametrize("h,w", [(48, 48), (40, 56), (24, 24)])
def test_call_time_interpolate_pos_encoding_matches_hf(vit_pair, h, w):
    loaded, ref = vit_pair
    x = _pixels(2, h, w)
    out = loaded.model.apply(loaded.variables, pixel_values=x, interpolate_pos_encoding=True)
    want = _torch_out(ref, x, interpolate_pos_encoding=True)
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state) <= TOL


def test_resampling_keeps_cls_row_and_same_size_is_identity():
    table = np.random.RandomState(0).randn(1, 17, 5).astype(np.float32)
    np.testing.assert_array_equal(vit.resample_table(table, (4, 4), (4, 4)), table)
    bigger = vit.resample_table(table, (4, 4), (7, 7))
    assert bigger.shape == (1, 50, 5)
    np.testing.assert_array_equal(bigger[:, 0], table[:, 0])


def test_resampled_model_saves_as_hf_model_of_new_size(vit_48, tmp_path):
    from transformers import ViTModel

    folder = tm.save_pretrained(tmp_path / "vit48", vit_48)
    ref = ViTModel.from_pretrained(folder).eval()
    assert ref.config.image_size == 48
    x = _pixels(2, 48, 48)
    out = vit_48.model.apply(vit_48.variables, pixel_values=x)
    assert max_abs_diff(out["last_hidden_state"], _torch_out(ref, x).last_hidden_state) <= TOL


def test_save_pretrained_round_trip(vit_pair, tmp_path):
    from transformers import ViTModel

    loaded, ref = vit_pair
    back = ViTModel.from_pretrained(tm.save_pretrained(tmp_path / "vit", loaded)).eval()
    x = _pixels(2)
    a, b = _torch_out(ref, x), _torch_out(back, x)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)


def test_layer_id_and_block_regex(vit_pair):
    loaded, _ = vit_pair
    expected = {
        "embeddings/cls_token": 0,
        "embeddings/position_embeddings": 0,
        "embeddings/patch_embeddings/kernel": 0,
        "embeddings/patch_embeddings/bias": 0,
        "encoder/layer_0/attention/query/kernel": 1,
        "encoder/layer_0/mlp_norm/bias": 1,
        "encoder/layer_1/mlp/fc2/kernel": 2,
        "final_norm/scale": 3,
        "final_norm/bias": 3,
        "pooler/dense/kernel": 3,
        "pooler/dense/bias": 3,
    }
    assert {p: vit.layer_id(p, 2) for p in expected} == expected
    paths = tree.paths(loaded.params)
    assert set(expected) <= set(paths)
    assert max(vit.layer_id(p, 2) for p in paths) == 3
    import re

    assert all(p.startswith("encoder/layer_1/") for p in paths if re.search(vit.block_regex(1), p))


def test_dropout_only_in_train_mode():
    cfg = _config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = vit.build(cfg)
    variables = model.init(jax.random.key(0), **vit.dummy_inputs(cfg))
    x = _pixels(2)
    a = model.apply(variables, pixel_values=x)["last_hidden_state"]
    b = model.apply(variables, pixel_values=x, train=True, rngs={"dropout": jax.random.key(1)})["last_hidden_state"]
    assert not np.allclose(a, b)


def test_unsupported_options_are_errors():
    with pytest.raises(ValueError, match="qkv_bias"):
        vit.build(_config(qkv_bias=False))


def test_bf16_compute_close_to_fp32(vit_pair, vit_dir):
    loaded, _ = vit_pair
    half = tm.load_pretrained(vit_dir, dtype="bfloat16")
    assert half.params["embeddings"]["position_embeddings"].dtype == jnp.bfloat16
    x = _pixels(2)
    a = loaded.model.apply(loaded.variables, pixel_values=x)["last_hidden_state"]
    b = half.model.apply(half.variables, pixel_values=x)["last_hidden_state"]
    assert b.dtype == jnp.bfloat16
    assert max_abs_diff(a, b) < 0.1


def test_build_does_not_touch_config_without_image_size():
    cfg = _config()
    before = cfg.to_dict()
    vit.build(cfg, image_size=32)
    assert cfg.to_dict() == before


def test_resampling_with_head_uses_backbone_prefix(classifier_dir):
    folder, ref = classifier_dir
    loaded = tm.load_pretrained(folder, num_classes=5, image_size=48)
    assert loaded.report.adapted == {"params/backbone/embeddings/position_embeddings": "resampled 4x4 -> 6x6"}
    x = _pixels(1, 48, 48)
    out = loaded.model.apply(loaded.variables, pixel_values=x)
    want = _torch_out(ref.vit, x, interpolate_pos_encoding=True)
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state) <= TOL


def test_vit_num_layers_matches_transformers(vit_dir):
    """load_pretrained(num_layers=1) = ViTModel.from_pretrained(num_hidden_layers=1): block 0, then the final
    LayerNorm and pooler of the whole model."""
    from transformers import ViTModel

    loaded = tm.load_pretrained(vit_dir, num_layers=1)
    assert all(k.startswith("encoder.layer.1.") for k in loaded.report.ignored) and loaded.report.ignored
    x = _pixels(2, seed=4)
    out = loaded.model.apply(loaded.variables, pixel_values=x)
    want = _torch_out(ViTModel.from_pretrained(vit_dir, num_hidden_layers=1).eval(), x)
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state) <= TOL
    assert max_abs_diff(out["pooler_output"], want.pooler_output) <= TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_gelu_matches_pytorch(dtype):
    """HF's "gelu" is PyTorch's erf GELU; jax.nn.gelu(approximate=False) went through erfc, which XLA:CPU computes
    3x slower, and in bfloat16 it differed from PyTorch by up to 0.016 (1 + erf cancels unless widened)."""
    from tljax.models.layers import activation

    x = np.linspace(-8, 8, 20001, dtype=np.float32)
    ours = activation("gelu")(jnp.asarray(x, dtype=dtype))
    want = torch.nn.functional.gelu(torch.tensor(x).to(getattr(torch, dtype))).float().numpy()
    assert ours.dtype == jnp.dtype(dtype)
    got = np.asarray(ours.astype(jnp.float32))
    assert np.abs(got - want).max() <= (2e-6 if dtype == "float32" else 2e-5)
    assert (got == want).mean() > 0.5
