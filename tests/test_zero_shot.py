"""CLIP zero-shot classification on the planted stand-in of openai/clip-vit-base-patch32 (tiny towers, a real CLIP
tokenizer): logits equal transformers' `logits_per_image`, prompt ensembling is the mean of normalised prompt
embeddings, masked rows are not counted, the job's "zero_shot" mode runs end to end, and wrong inputs are clear
errors."""

from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pytest
from conftest import max_abs_diff
from ml_collections import ConfigDict

import tljax.models as tm
from tljax import job, zero_shot
from tljax.job import untrained

CLIP_ID = "openai/clip-vit-base-patch32"
NAMES = ["t-shirt", "trouser", "ankle boot"]


def snapshot(hub: object, repo_id: str) -> str:
    return str(next((hub / ("models--" + repo_id.replace("/", "--")) / "snapshots").iterdir()))


@pytest.fixture(scope="module")
def clip_dir(planted_hub):
    return snapshot(planted_hub, CLIP_ID)


@pytest.fixture(scope="module")
def loaded(clip_dir):
    return tm.load_pretrained(clip_dir)


@pytest.fixture(scope="module")
def tokenizer(clip_dir):
    return zero_shot.load_tokenizer(clip_dir)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, 224, 224).astype(np.float32)


def test_the_stand_in_tokenizer_is_a_clip_tokenizer(clip_dir, loaded):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(clip_dir)
    assert type(auto).__name__ == "CLIPTokenizer" and len(auto) == loaded.hf_config.text_config.vocab_size
    words = auto.convert_ids_to_tokens(auto("A photo of a T-shirt/top.")["input_ids"])
    assert words == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "t</w>", "-</w>", "shirt</w>", "/</w>",
                     "top</w>", ".</w>", "<|endoftext|>"]  # fmt: skip
    assert auto.eos_token_id == len(auto) - 1  # the largest id, where the legacy (eos_token_id 2) rule pools


def test_logits_match_transformers_logits_per_image(clip_dir, loaded, tokenizer):
    """One template: class embeddings padded to 77 tokens, scored by the zero-shot head, equal HF's CLIPModel on the
    same prompts padded to their own length."""
    import torch
    from transformers import CLIPModel

    template = ["a photo of a {}."]
    weights = zero_shot.class_embeddings(loaded, tokenizer, NAMES, template)
    px = pixels(4)
    logits = zero_shot.zero_shot_predict(loaded, weights, [{"pixel_values": px}]).logits
    enc = tokenizer(zero_shot.prompts(NAMES, template), padding=True, return_tensors="pt")
    with torch.no_grad():
        want = CLIPModel.from_pretrained(clip_dir).eval()(**enc, pixel_values=torch.tensor(px)).logits_per_image
    assert logits.shape == (4, 3) and max_abs_diff(logits, want.numpy()) <= 1e-4
    with_head = tm.load_pretrained(clip_dir, num_classes=3)  # a job's model: the backbone's text tower is used
    np.testing.assert_allclose(zero_shot.class_embeddings(with_head, tokenizer, NAMES, template), weights, atol=1e-6)


def test_prompt_ensembling_is_the_mean_of_normalised_prompt_embeddings(loaded, tokenizer):
    texts = zero_shot.prompts(NAMES, zero_shot.TEMPLATES)
    assert len(texts) == 3 * len(zero_shot.TEMPLATES) and texts[1] == zero_shot.TEMPLATES[1].format("t-shirt")
    enc = tokenizer(texts, padding=True, return_tensors="np")
    emb = np.asarray(loaded.model.apply(loaded.variables, **enc)["text_embeds"], np.float64)
    unit = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).reshape(3, len(zero_shot.TEMPLATES), -1)
    mean = unit.mean(1)
    want = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    got = zero_shot.class_embeddings(loaded, tokenizer, NAMES, batch_size=4)  # 6 batches, the last one padded
    assert got.shape == (3, 16) and got.dtype == np.float32 and max_abs_diff(got, want) <= 1e-5


def test_masked_rows_are_not_counted(loaded, tokenizer):
    weights = zero_shot.class_embeddings(loaded, tokenizer, NAMES)
    px, labels = pixels(8, seed=1), np.array([0, 1, 2, 0, 1, 2, 0, 0])
    batches = [{"pixel_values": px[:4], "labels": labels[:4]},
               {"pixel_values": px[4:], "labels": labels[4:], "mask": np.array([1, 1, 0, 0], np.float32)}]  # fmt: skip
    preds = zero_shot.zero_shot_predict(loaded, weights, batches, label_names=NAMES)
    assert len(preds) == 6 and np.array_equal(preds.targets, labels[:6])
    report = zero_shot.zero_shot_evaluate(loaded, weights, batches, label_names=NAMES)
    assert report.metrics["accuracy"] == pytest.approx(np.mean(preds.labels == labels[:6]))
    assert report.support.tolist() == [2, 2, 2] and report.label_names == tuple(NAMES)


def zero_shot_config(**zero_shot_overrides):
    from experiments.configs.clip_zero_shot import get_config

    config = get_config()
    config.data.update(dict(train_size=20, validation_size=12, test_size=30, batch_size=10, eval_batch_size=16))
    config.zero_shot.update(zero_shot_overrides)
    return config


def test_the_job_runs_zero_shot(hub_cache, tmp_path):
    from experiments.configs.clip_zero_shot import CLASS_NAMES

    config = zero_shot_config(templates=["a photo of a {}.", "a photo of the {}."])
    results = job.run(config, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["mode"] == "zero_shot" and 0 <= results["test_accuracy"] <= 1
    assert results["test_accuracy"] == results["test"]["accuracy"] and 0 <= results["validation"]["accuracy"] <= 1
    assert results["zero_shot"]["templates"] == ["a photo of a {}.", "a photo of the {}."]
    assert results["zero_shot"]["class_names"] == CLASS_NAMES  # the config's names, not the labels
    assert results["data"]["label_names"][0] == "T-shirt/top"
    assert list(results["per_class_test_accuracy"]) == results["data"]["label_names"]
    assert results["data"]["sizes"] == {"train": 20, "validation": 12, "test": 30}
    assert sum(map(sum, results["confusion_matrix"])) == 30  # the padded rows of the last test batch not counted
    assert set(results["versions"]) >= {"jax", "flax", "tljax"} and results["config"]["mode"] == "zero_shot"
    assert "zero-shot CLIP, 2 templates x 10 classes" in job.flat_summary(results)
    assert job.run(config, tmp_path / "run") == json.loads(json.dumps(results))  # finished: reported again


def test_class_names_default_to_the_labels_and_replace_them():
    labels = ("T-shirt/top", "Trouser")
    fake = lambda **zs: types.SimpleNamespace(config=ConfigDict({"zero_shot": zs}), label_names=labels)
    assert untrained.zero_shot_prompts(fake(templates=[], class_names=[])) == (list(labels), list(zero_shot.TEMPLATES))
    names, templates = untrained.zero_shot_prompts(
        fake(templates=["itap of a {}."], class_names=["t-shirt", "trouser"])
    )
    assert names == ["t-shirt", "trouser"] and templates == ["itap of a {}."]
    assert zero_shot.prompts(names, templates) == ["itap of a t-shirt.", "itap of a trouser."]
    with pytest.raises(ValueError, match="has 1 names but the data has 2 classes"):
        untrained.zero_shot_prompts(fake(templates=[], class_names=["t-shirt"]))


def test_clear_errors(planted_hub, clip_dir, loaded, tokenizer, tmp_path):
    bert_dir = snapshot(planted_hub, "bert-base-uncased")
    with pytest.raises(ValueError, match="needs a CLIP checkpoint with both towers .* this one is 'bert'"):
        zero_shot.class_embeddings(tm.load_pretrained(bert_dir), tokenizer, NAMES)
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(clip_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(tm.CheckpointError, match="has no tokenizer"):
        zero_shot.load_tokenizer(bare)
    with pytest.raises(ValueError, match="is it this checkpoint's tokenizer"):
        zero_shot.class_embeddings(loaded, tm.load_tokenizer(bert_dir), NAMES)
    other_eos = tm.load_tokenizer(clip_dir, eos_token="<|startoftext|>")
    with pytest.raises(ValueError, match="would not pool at the tokenizer's end-of-text token"):
        zero_shot.class_embeddings(loaded, other_eos, NAMES)
    with pytest.raises(ValueError, match="must hold '{}'"):
        zero_shot.class_embeddings(loaded, tokenizer, NAMES, ["a photo"])
    with pytest.raises(ValueError, match=r"class_embeds must be \(classes, 16\)"):
        zero_shot.zero_shot_predict(loaded, np.zeros((3, 8)), [{"pixel_values": pixels(1)}])
