"""Heads survive save -> load for every family, load in transformers' classification classes with the same logits,
and a checkpoint head that does not match the request is an error, never silently replaced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import max_abs_diff, save_tiny, token_batch

import tljax.models as tm
from tljax import tree
from tljax.models import CheckpointError

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _randomise_batchnorm(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def _vit(folder):
    from transformers import ViTConfig, ViTModel

    return save_tiny(folder, ViTModel(ViTConfig(**TINY, image_size=32, patch_size=16)))


def _resnet(folder):
    from transformers import ResNetConfig, ResNetModel

    model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    _randomise_batchnorm(model)
    return save_tiny(folder, model.eval())


def _clip(folder):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(TINY, vocab_size=99, max_position_embeddings=16),
        vision_config=dict(TINY, image_size=32, patch_size=16),
        projection_dim=16,
    )
    return save_tiny(folder, CLIPModel(cfg))


def _clip_vision(folder):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**TINY, image_size=32, patch_size=16, projection_dim=16)
    return save_tiny(folder, CLIPVisionModelWithProjection(cfg))


BUILDERS = {"vit": _vit, "resnet": _resnet, "clip": _clip, "clip_vision": _clip_vision}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_bert_dir, tiny_roberta_dir):
    torch.manual_seed(0)
    out = {"bert": tiny_bert_dir, "roberta": tiny_roberta_dir}
    for name, build in BUILDERS.items():
        out[name] = build(tmp_path_factory.mktemp(name))
    return out


def _inputs(family: str) -> dict:
    if family in ("bert", "roberta"):
        ids, mask = token_batch(3, 7, pad_id=1 if family == "roberta" else 0)
        return {"input_ids": ids, "attention_mask": mask}
    return {"pixel_values": np.random.RandomState(0).randn(3, 3, 32, 32).astype(np.float32)}


def _torch_inputs(inputs: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.long if k != "pixel_values" else torch.float32) for k, v in inputs.items()}


def _tuned(loaded):
    """Params as if fine-tuned: every weight moved, the (zero-initialised) head random."""
    leaves, treedef = jax.tree.flatten(loaded.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noise = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noise)


def _logits(loaded, params, inputs):
    return np.asarray(loaded.model.apply({"params": params, **loaded.state}, **inputs)["logits"])


# family, pooling, head layout (hidden), the transformers class that shares it (None: tljax_head.safetensors)
CASES = [
    ("bert", "pooler", 0, "BertForSequenceClassification"),
    ("bert", "mean", 0, None),
    ("roberta", "cls", 32, "RobertaForSequenceClassification"),
    ("vit", "cls", 0, "ViTForImageClassification"),
    ("vit", "mean", 0, None),
    ("resnet", "pooler", 0, "ResNetForImageClassification"),
    ("clip", "image_embeds", 0, None),
    ("clip_vision", "image_embeds", 0, None),
]


@pytest.mark.parametrize("family,pooling,hidden,hf_class", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_save_load_round_trip_keeps_the_head(folders, tmp_path, family, pooling, hidden, hf_class):
    """Regression: save_pretrained wrote the head but load_pretrained never read it (a fresh head predicted
    garbage). Now `load_pretrained(folder)` with no head arguments gives the same logits."""
    head = tm.ClassificationHead(4, hidden=hidden)
    loaded = tm.load_pretrained(folders[family], head=head, pooling=pooling)
    params, inputs = _tuned(loaded), _inputs(family)
    with pytest.raises(ValueError, match=r"label_names names \['a'\] more than once"):  # label2id would lose a class
        tm.save_pretrained(tmp_path / "dup", loaded, params=params, label_names=["a", "a", "c", "d"])
    out = tm.save_pretrained(tmp_path / "export", loaded, params=params, label_names=["a", "b", "c", "d"])
    assert (out / "tljax_head.safetensors").is_file() == (hf_class is None)
    again = tm.load_pretrained(out)
    assert again.model.pooling == pooling and again.model.head.hidden == hidden
    assert not again.report.reinitialized
    assert max_abs_diff(_logits(again, again.params, inputs), _logits(loaded, params, inputs)) <= 1e-6
    if hf_class is None:
        return
    import transformers

    ref = getattr(transformers, hf_class).from_pretrained(out).eval()
    assert ref.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    with torch.no_grad():
        want = ref(**_torch_inputs(inputs)).logits.numpy()
    assert max_abs_diff(_logits(loaded, params, inputs), want) <= 1e-5


def test_transformers_classifier_checkpoint_loads_into_the_head(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    ref = BertForSequenceClassification(BertConfig(vocab_size=99, **TINY, num_labels=3)).eval()
    ref.save_pretrained(tmp_path)
    loaded = tm.load_pretrained(tmp_path, num_classes=3)  # pooling follows the checkpoint's class: "pooler"
    assert loaded.model.pooling == "pooler" and loaded.report.reinitialized == []
    inputs = _inputs("bert")
    with torch.no_grad():
        want = ref(**_torch_inputs(inputs)).logits.numpy()
    assert max_abs_diff(_logits(loaded, loaded.params, inputs), want) <= 1e-5
    backbone = tm.load_pretrained(tmp_path)  # no head asked: the classifier is reported, not loaded
    assert backbone.report.ignored == ["classifier.bias", "classifier.weight"]


def test_a_checkpoint_head_that_does_not_match_is_an_error(tmp_path, tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=4, pooling="mean")
    out = tm.save_pretrained(tmp_path / "four", loaded, params=_tuned(loaded))
    with pytest.raises(
        CheckpointError, match=r"head does not match the requested one \(4 classes, 5 requested\).*reinit=\["
    ):
        tm.load_pretrained(out, num_classes=5)
    with pytest.raises(CheckpointError, match="trained on pooling='mean' features, but pooling='cls'"):
        tm.load_pretrained(out, num_classes=4, pooling="cls")
    fresh = tm.load_pretrained(out, num_classes=5, reinit=[r"^head/"])
    assert fresh.report.reinitialized == ["params/head/out/bias", "params/head/out/kernel"]
    assert "head/out/kernel" in " ".join(fresh.report.ignored)
    assert not np.any(np.asarray(fresh.params["head"]["out"]["kernel"]))
    same = tm.load_pretrained(out, num_classes=4)
    assert np.array_equal(same.params["head"]["out"]["kernel"], np.asarray(_tuned(loaded)["head"]["out"]["kernel"]))


def test_custom_heads_load_by_passing_the_module_again(tmp_path, tiny_bert_dir):
    head = tm.MultiHead({"topic": tm.ClassificationHead(4), "sentiment": tm.ClassificationHead(2, hidden=8)})
    loaded = tm.load_pretrained(tiny_bert_dir, head=head, pooling="pooler")
    params = _tuned(loaded)
    out = tm.save_pretrained(tmp_path / "multi", loaded, params=params)
    with pytest.raises(CheckpointError, match=r"custom head \(MultiHead\): pass head="):
        tm.load_pretrained(out)
    again = tm.load_pretrained(out, head=head)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(params), strict=True)
    )


def test_overwrite_replaces_a_folder_only_when_the_new_one_is_complete(tmp_path, tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=2, pooling="mean")
    out = tm.save_pretrained(tmp_path / "m", loaded)
    tm.save_pretrained(out, loaded, params=_tuned(loaded), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing left beside it
    kernel = tm.load_pretrained(out).params["head"]["out"]["kernel"]
    assert np.array_equal(kernel, np.asarray(_tuned(loaded)["head"]["out"]["kernel"]))


@pytest.mark.parametrize("bad", [0, -2, "3", True, 2.0])
def test_num_classes_must_be_a_positive_int(tiny_bert_dir, bad):
    with pytest.raises(ValueError, match=f"num_classes must be a positive int, got {bad!r}"):
        tm.load_pretrained(tiny_bert_dir, num_classes=bad)


def test_bf16_model_exports_fp32_and_reloads(tmp_path, tiny_bert_dir):
    half = tm.load_pretrained(tiny_bert_dir, num_classes=2, pooling="pooler", dtype="bfloat16")
    out = tm.save_pretrained(tmp_path / "half", half)
    again = tm.load_pretrained(out, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(again.params))
    assert tree.count(again.params) == tree.count(half.params)
