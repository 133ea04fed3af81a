"""CLIP parity with transformers' PyTorch `CLIPModel` / `CLIPVisionModel[WithProjection]`, plus the zero-shot
helpers, single-tower calls, export round trip and layer-wise LR decay ids."""

import re

import jax
import numpy as np
import pytest
import torch
from conftest import max_abs_diff, save_tiny, token_batch

import tljax.models as tm
from tljax import tree
from tljax.models import clip

TOL = 1e-4
TEXT = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=16,
    pad_token_id=0,
    bos_token_id=1,
)
VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
)


def _tiny_clip(folder, seed: int, eos_token_id: int) -> str:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(TEXT, eos_token_id=eos_token_id), vision_config=VISION, projection_dim=16)
    return save_tiny(folder, CLIPModel(cfg).eval())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    # eos_token_id == 2: the legacy rule (pool at the largest id), as in the original OpenAI configs
    return _tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, eos_token_id=2)


@pytest.fixture(scope="module")
def pair(clip_dir):
    from transformers import CLIPModel

    return tm.load_pretrained(clip_dir), CLIPModel.from_pretrained(clip_dir).eval()


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, 32, 32).astype(np.float32)


def _torch_all(ref, ids, mask, px) -> dict:
    """Every output tljax returns, from the PyTorch model (tower pooler outputs before projection)."""
    ids_t, mask_t, px_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask), torch.tensor(px)
    with torch.no_grad():
        joint = ref(input_ids=ids_t, attention_mask=mask_t, pixel_values=px_t)
        text = ref.text_model(input_ids=ids_t, attention_mask=mask_t)
        vision = ref.vision_model(pixel_values=px_t)
    return {
        "text_last_hidden_state": text.last_hidden_state,
        "text_pooler_output": text.pooler_output,
        "vision_last_hidden_state": vision.last_hidden_state,
        "vision_pooler_output": vision.pooler_output,
        "image_embeds": joint.image_embeds,
        "text_embeds": joint.text_embeds,
        "logits_per_image": joint.logits_per_image,
        "logits_per_text": joint.logits_per_text,
    }


def _assert_parity(out: dict, want: dict) -> dict:
    diffs = {k: max_abs_diff(out[k], v) for k, v in want.items()}
    bad = {k: d for k, d in diffs.items() if not d <= TOL}
    assert not bad, f"parity failures: {bad}"
    return diffs


@pytest.mark.parametrize("texts,length,images", [(1, 6, 1), (3, 9, 2)])
def test_clip_parity_with_padding(pair, texts, length, images):
    loaded, ref = pair
    ids, mask = token_batch(texts, length)
    px = _pixels(images)
    out = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask, pixel_values=px)
    _assert_parity(out, _torch_all(ref, ids, mask, px))
    assert out["logits_per_image"].shape == (images, texts)
    np.testing.assert_array_equal(out["last_hidden_state"], out["vision_last_hidden_state"])
    np.testing.assert_array_equal(out["pooler_output"], out["vision_pooler_output"])


def test_eos_pooling_by_token_id(tmp_path):
    """A post-#24773 config pools at the first eos_token_id (padding may repeat it), not at the largest id."""
    from transformers import CLIPModel

    eos = 1
    folder = _tiny_clip(tmp_path, seed=3, eos_token_id=eos)
    loaded, ref = tm.load_pretrained(folder), CLIPModel.from_pretrained(folder).eval()
    ids, mask = token_batch(3, 9)  # ids >= 2, so eos=1 is never the largest id
    ids[mask == 0] = eos
    ids[np.arange(3), mask.sum(1) - 1] = eos
    assert not np.array_equal(ids.argmax(-1), (ids == eos).argmax(-1))  # the two rules disagree on this batch
    px = _pixels(2)
    out = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask, pixel_values=px)
    _assert_parity(out, _torch_all(ref, ids, mask, px))


def test_param_count_and_paths_match_hf(pair):
    loaded, ref = pair
    assert tree.count(loaded.params) == sum(p.numel() for p in ref.parameters())
    paths = set(tree.paths(loaded.params))
    for p in [
        "vision/embeddings/class_embedding",
        "vision/embeddings/patch_embedding/kernel",
        "vision/embeddings/position_embedding/embedding",
        "vision/pre_norm/scale",
        "vision/post_norm/bias",
        "vision/encoder/layer_1/attention/query/kernel",
        "text/embeddings/token_embedding/embedding",
        "text/embeddings/position_embedding/embedding",
        "text/encoder/layer_0/mlp/fc1/kernel",
        "text/final_norm/scale",
        "visual_projection/kernel",
        "text_projection/kernel",
        "logit_scale",
    ]:
        assert p in paths, p
    assert loaded.params["logit_scale"].shape == ()
    assert not any("bias" in p for p in paths if "projection" in p)
    assert loaded.params["vision"]["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)


def test_single_tower_calls(pair):
    loaded, _ = pair
    ids, mask = token_batch(3, 7)
    px = _pixels(2)
    both = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask, pixel_values=px)
    text = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)
    image = loaded.model.apply(loaded.variables, pixel_values=px)
    assert "logits_per_image" not in text and "image_embeds" not in text
    assert "logits_per_image" not in image and "text_embeds" not in image
    np.testing.assert_allclose(text["text_embeds"], both["text_embeds"], atol=1e-6)
    np.testing.assert_allclose(image["image_embeds"], both["image_embeds"], atol=1e-6)
    np.testing.assert_array_equal(text["last_hidden_state"], text["text_last_hidden_state"])
    np.testing.assert_array_equal(image["pooler_output"], image["vision_pooler_output"])
    with pytest.raises(ValueError, match="input_ids"):
        loaded.model.apply(loaded.variables)


def test_bad_input_shapes_are_errors(pair):
    loaded, _ = pair
    with pytest.raises(ValueError, match="max_position_embeddings"):
        loaded.model.apply(loaded.variables, input_ids=np.zeros((1, 17), np.int32))
    with pytest.raises(ValueError, match="do not match"):
        loaded.model.apply(loaded.variables, pixel_values=np.zeros((1, 3, 64, 64), np.float32))


def test_zero_shot_matches_hf_logits(pair):
    loaded, ref = pair
    ids, mask = token_batch(3, 9)  # one prompt per class
    px = _pixels(4, seed=1)
    want = _torch_all(ref, ids, mask, px)["logits_per_image"].numpy()
    text = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)["text_embeds"]
    image = loaded.model.apply(loaded.variables, pixel_values=px)["image_embeds"]
    logits = clip.zero_shot_logits(image, clip.zero_shot_classifier(text), loaded.params["logit_scale"])
    assert max_abs_diff(logits, want) <= TOL
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(want, -1))


def test_zero_shot_classifier_ensembles_templates():
    rng = np.random.RandomState(0)
    emb = rng.randn(5, 3, 16).astype(np.float32)  # 5 classes x 3 templates
    w = np.asarray(clip.zero_shot_classifier(emb))
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    mean = unit.mean(1)
    np.testing.assert_allclose(w, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(clip.zero_shot_classifier(emb[:, :1]), clip.zero_shot_classifier(emb[:, 0]), atol=1e-6)


def test_save_pretrained_round_trip_into_transformers(pair, tmp_path):
    from transformers import CLIPModel

    loaded, _ = pair
    # change every weight so the export is checked against values HF never had
    params = jax.tree.map(
        lambda x: x + 0.01 * np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape), loaded.params
    )
    folder = tm.save_pretrained(tmp_path / "export", loaded, params=params)
    back = CLIPModel.from_pretrained(folder).eval()
    ids, mask = token_batch(3, 9)
    px = _pixels(2)
    out = loaded.model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=px)
    _assert_parity(out, _torch_all(back, ids, mask, px))


def test_head_on_image_embeds(clip_dir):
    loaded = tm.load_pretrained(clip_dir, num_classes=5)
    assert loaded.report.reinitialized == ["params/head/out/bias", "params/head/out/kernel"]
    out = loaded.model.apply(loaded.variables, pixel_values=_pixels(2))
    assert out["logits"].shape == (2, 5)
    np.testing.assert_array_equal(out["features"], out["image_embeds"])


def test_layer_ids_and_block_regex(pair):
    loaded, _ = pair
    n = clip.num_layers(loaded.hf_config)
    assert n == 2
    ids = {p: clip.layer_id(p, n) for p in tree.paths(loaded.params)}
    assert ids["vision/embeddings/class_embedding"] == 0
    assert ids["vision/pre_norm/scale"] == 0
    assert ids["vision/encoder/layer_0/attention/query/kernel"] == 1
    assert ids["vision/encoder/layer_1/mlp_norm/bias"] == 2
    for p in [
        "vision/post_norm/scale",
        "visual_projection/kernel",
        "logit_scale",
        "text/embeddings/token_embedding/embedding",
        "text/encoder/layer_0/mlp/fc1/kernel",
    ]:
        assert ids[p] == n + 1, p
    block = [p for p in ids if re.search(clip.block_regex(1), p)]
    assert block and all(p.startswith("vision/encoder/layer_1/") for p in block)


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(2)
    cfg = CLIPVisionConfig(**VISION, projection_dim=16)
    return (
        save_tiny(tmp_path_factory.mktemp("tiny_clip_vision_proj"), CLIPVisionModelWithProjection(cfg).eval()),
        save_tiny(tmp_path_factory.mktemp("tiny_clip_vision"), CLIPVisionModel(cfg).eval()),
    )


def test_clip_vision_model_with_projection(vision_dirs, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    folder = vision_dirs[0]
    loaded, ref = tm.load_pretrained(folder), CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    assert tree.count(loaded.params) == sum(p.numel() for p in ref.parameters())
    px = _pixels(2)
    out = loaded.model.apply(loaded.variables, pixel_values=px)
    with torch.no_grad():
        want = ref(pixel_values=torch.tensor(px))
    image_embeds = want.image_embeds / want.image_embeds.norm(dim=-1, keepdim=True)  # tljax always normalises
    _assert_parity(out, {"last_hidden_state": want.last_hidden_state, "image_embeds": image_embeds})
    with pytest.raises(ValueError, match="no text tower"):
        loaded.model.apply(loaded.variables, input_ids=np.zeros((1, 3), np.int32))
    back = CLIPVisionModelWithProjection.from_pretrained(tm.save_pretrained(tmp_path / "export", loaded)).eval()
    with torch.no_grad():
        assert max_abs_diff(back(pixel_values=torch.tensor(px)).image_embeds, want.image_embeds) == 0.0


def test_clip_vision_model_without_projection(vision_dirs, tmp_path):
    """transformers 5 writes bare keys (`embeddings.*`); hub checkpoints and tljax exports use `vision_model.*`."""
    from transformers import CLIPVisionModel

    folder = vision_dirs[1]
    loaded, ref = tm.load_pretrained(folder), CLIPVisionModel.from_pretrained(folder).eval()
    assert "visual_projection" not in loaded.params and "image_embeds" not in (
        out := loaded.model.apply(loaded.variables, pixel_values=(px := _pixels(2)))
    )
    with torch.no_grad():
        want = ref(pixel_values=torch.tensor(px))
    _assert_parity(out, {"last_hidden_state": want.last_hidden_state, "pooler_output": want.pooler_output})
    export = tm.save_pretrained(tmp_path / "export", loaded)
    back = CLIPVisionModel.from_pretrained(export).eval()
    with torch.no_grad():
        assert max_abs_diff(back(pixel_values=torch.tensor(px)).pooler_output, want.pooler_output) == 0.0
    again = tm.load_pretrained(export)  # the prefixed (hub) layout
    assert max_abs_diff(again.model.apply(again.variables, pixel_values=px)["pooler_output"], out["pooler_output"]) == 0
    head = tm.load_pretrained(folder, num_classes=3, pooling="pooler")
    assert head.model.apply(head.variables, pixel_values=px)["logits"].shape == (2, 3)


def test_unsupported_config_options_are_errors():
    from transformers import CLIPConfig

    cfg = CLIPConfig(text_config=dict(TEXT, eos_token_id=[2, 3]), vision_config=VISION, projection_dim=16)
    with pytest.raises(ValueError, match="eos_token_id"):
        clip.build(cfg)
    cfg = CLIPConfig(text_config=TEXT, vision_config=dict(VISION, image_size=[32, 48]), projection_dim=16)
    with pytest.raises(ValueError, match="image_size"):
        clip.build(cfg)
    cfg = CLIPConfig(text_config=dict(TEXT, hidden_act="mystery"), vision_config=VISION, projection_dim=16)
    with pytest.raises(ValueError, match="mystery"):
        clip.build(cfg)


def test_bf16_compute_close_to_fp32(pair, clip_dir):
    import jax.numpy as jnp

    loaded, _ = pair
    half = tm.load_pretrained(clip_dir, dtype="bfloat16")
    ids, mask = token_batch(2, 6)
    px = _pixels(2)
    a = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask, pixel_values=px)
    b = half.model.apply(half.variables, input_ids=ids, attention_mask=mask, pixel_values=px)
    assert b["image_embeds"].dtype == jnp.bfloat16
    assert max_abs_diff(a["image_embeds"], b["image_embeds"]) < 0.1


def test_higher_resolution_resamples_positions_like_hf(pair, clip_dir, tmp_path):
    """Loaded at 48x48 (a 6x6 grid from the 4x4 checkpoint), CLIP matches HF's `interpolate_pos_encoding=True`,
    and the exported folder (config image_size 48) reloads in transformers as is."""
    from transformers import CLIPModel

    _, ref = pair
    big = tm.load_pretrained(clip_dir, image_size=48)
    assert big.report.adapted == {"params/vision/embeddings/position_embedding/embedding": "resampled 4x4 -> 6x6"}
    px = np.random.RandomState(3).randn(2, 3, 48, 48).astype(np.float32)
    out = big.model.apply(big.variables, pixel_values=px)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=torch.tensor(px), interpolate_pos_encoding=True)
    assert max_abs_diff(out["vision_last_hidden_state"], want.last_hidden_state) <= TOL
    assert max_abs_diff(out["vision_pooler_output"], want.pooler_output) <= TOL
    reloaded = CLIPModel.from_pretrained(tm.save_pretrained(tmp_path / "clip48", big)).eval()
    with torch.no_grad():
        again = reloaded.vision_model(pixel_values=torch.tensor(px)).last_hidden_state
    assert max_abs_diff(out["vision_last_hidden_state"], again) <= TOL
