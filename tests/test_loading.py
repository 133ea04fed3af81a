"""load_pretrained / save_pretrained behaviour: strict merging, reports, heads, bad input, export round trip."""

import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import max_abs_diff, token_batch

import tljax.models as tm
from tljax import tree
from tljax.models import CheckpointError


@pytest.fixture
def bert_copy(tiny_bert_dir, tmp_path):
    """A writable copy of the tiny BERT folder that a test may corrupt."""
    return shutil.copytree(tiny_bert_dir, tmp_path / "bert")


def _rewrite(folder, fn):
    from safetensors.numpy import load_file, save_file

    tensors = fn(load_file(folder / "model.safetensors"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_report_counts_every_tensor(tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir)
    assert len(loaded.report.loaded) == len(tree.paths(loaded.params)) == 39  # 5 embedding + 2 x 16 block + 2 pooler
    assert loaded.report.reinitialized == [] and loaded.report.ignored == []
    assert "39 tensors" in str(loaded.report)


def test_inputs_are_keyword_only(tiny_bert_dir):
    """Regression: `WithHead` took attention_mask only as a keyword; passed by position, mean pooling ran over
    padding with no error. Inputs are keyword-only (HF names), and `Pretrained` no longer unpacks as
    `model, params` (which dropped BatchNorm statistics)."""
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=2, pooling="mean")
    ids, mask = token_batch(2, 5)
    assert loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)["logits"].shape == (2, 2)
    with pytest.raises(TypeError):
        loaded.model.apply(loaded.variables, ids, mask)
    plain = tm.load_pretrained(tiny_bert_dir)
    with pytest.raises(TypeError):
        plain.model.apply(plain.variables, ids, mask)
    with pytest.raises(TypeError):
        model, params = plain


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tm.load_pretrained(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        tm.load_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported(bert_copy):
    cfg = json.loads((bert_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bert_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*bert"):
        tm.load_pretrained(bert_copy)


def test_shape_mismatch_names_key_and_shapes(bert_copy):
    cfg = json.loads((bert_copy / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (bert_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch: checkpoint tensor 'encoder.layer.0.intermediate"
        r".dense.(weight|bias)' has shape .* expects",
    ):
        tm.load_pretrained(bert_copy)


def test_unexpected_key_is_an_error_until_ignored(bert_copy):
    _rewrite(bert_copy, lambda t: {**t, "extra.adapter.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"no place in the model: \[extra.adapter.weight\].*ignore="):
        tm.load_pretrained(bert_copy)
    loaded = tm.load_pretrained(bert_copy, ignore=[r"^extra\."])
    assert loaded.report.ignored == ["extra.adapter.weight"]


def test_missing_tensor_is_an_error_until_reinit(bert_copy):
    _rewrite(bert_copy, lambda t: {k: v for k, v in t.items() if not k.startswith("encoder.layer.1.output.dense")})
    with pytest.raises(CheckpointError, match=r"not in the checkpoint: \[encoder/layer_1/mlp/fc2/bias"):
        tm.load_pretrained(bert_copy)
    loaded = tm.load_pretrained(bert_copy, reinit=["layer_1/mlp/fc2"])
    assert loaded.report.reinitialized == [
        "params/encoder/layer_1/mlp/fc2/bias",
        "params/encoder/layer_1/mlp/fc2/kernel",
    ]
    assert float(np.abs(loaded.params["encoder"]["layer_1"]["mlp"]["fc2"]["kernel"]).sum()) > 0


def test_pattern_matching_nothing_is_an_error(tiny_bert_dir):
    with pytest.raises(CheckpointError, match=r"reinit pattern\(s\) \['layer_9'\] match no model parameter"):
        tm.load_pretrained(tiny_bert_dir, reinit=["layer_9"])
    with pytest.raises(CheckpointError, match="ignore pattern"):
        tm.load_pretrained(tiny_bert_dir, ignore=["typo"])
    with pytest.raises(TypeError, match="list of regexes"):
        tm.load_pretrained(tiny_bert_dir, reinit="pooler")


def test_ignore_matching_tensors_the_model_loads_is_an_error(tiny_bert_dir):
    """Regression: ignore=[r"^pooler[.]"] passed its "must match" check and the pooler loaded anyway, reported as
    neither ignored nor anything else. ignore= drops only tensors without a place; reinit= starts parameters afresh,
    and ignoring the tensors of parameters being re-initialised stays allowed."""
    message = r"ignore pattern(s) match checkpoint tensors the model loads: '^pooler\.': [pooler.dense.bias, pooler"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        tm.load_pretrained(tiny_bert_dir, ignore=[r"^pooler\."])
    loaded = tm.load_pretrained(tiny_bert_dir, ignore=[r"^pooler\."], reinit=["^pooler/"])
    assert loaded.report.reinitialized == ["params/pooler/dense/bias", "params/pooler/dense/kernel"]


def test_damaged_json_files_and_bad_options_are_named(bert_copy):
    """Regression: a truncated config.json / shard index raised a bare JSONDecodeError naming no file; another
    family's option or a dtype typo failed inside build() or numpy."""
    with pytest.raises(ValueError, match=r"bert models take no option \['image_size'\]; their options: .*dropout"):
        tm.load_pretrained(bert_copy, image_size=64)
    with pytest.raises(ValueError, match="dtype 'bf16' .* use 'float32' or 'bfloat16'"):
        tm.load_pretrained(bert_copy, dtype="bf16")
    config = bert_copy / "config.json"
    config.write_text(config.read_text()[:40])
    with pytest.raises(CheckpointError, match=rf"{config} is not valid JSON .* damaged; fetch or save it again"):
        tm.load_pretrained(bert_copy)


def test_pickle_needs_opt_in(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    folder = shutil.copytree(tiny_bert_dir, tmp_path / "bin")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        tm.load_pretrained(folder)
    a, b = tm.load_pretrained(folder, allow_pickle=True), tm.load_pretrained(tiny_bert_dir)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a.params, b.params))


def test_uncached_hub_id_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'google/bert-not-cached' is not in the local Hugging Face cache"):
        tm.load_pretrained("google/bert-not-cached")


def test_hub_id_resolves_from_cache(monkeypatch, tmp_path, tiny_bert_dir):
    """A cached hub snapshot (the layout huggingface_hub writes) loads offline by its id."""
    snap = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_bert_dir, snap)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert tree.count(tm.load_pretrained("org/tiny").params) == tree.count(tm.load_pretrained(tiny_bert_dir).params)


def test_for_sequence_classification_checkpoint_strips_prefix(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    loaded = tm.load_pretrained(tmp_path)
    assert loaded.report.ignored == ["classifier.bias", "classifier.weight"]
    assert "pooler" in loaded.params


def test_classification_head_is_new_and_separate(tiny_bert_dir):
    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=5, pooling="mean")
    assert set(loaded.params) == {"backbone", "head"}
    assert loaded.report.reinitialized == ["params/head/out/bias", "params/head/out/kernel"]
    ids, mask = token_batch(3, 6)
    out = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)
    assert out["logits"].shape == (3, 5)
    plain = tm.load_pretrained(tiny_bert_dir)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), loaded.params["backbone"], plain.params))
    want = tm.mean_pool(
        plain.model.apply(plain.variables, input_ids=ids, attention_mask=mask)["last_hidden_state"], mask
    )
    assert max_abs_diff(out["features"], want) == 0.0


def test_multi_head(tiny_bert_dir):
    head = tm.MultiHead({"topic": tm.ClassificationHead(4), "sentiment": tm.ClassificationHead(2, hidden=8)})
    loaded = tm.load_pretrained(tiny_bert_dir, head=head, pooling="pooler")
    out = loaded.model.apply(loaded.variables, input_ids=token_batch(2, 4)[0])
    assert out["logits"]["topic"].shape == (2, 4) and out["logits"]["sentiment"].shape == (2, 2)


def test_export_round_trip_into_transformers(tiny_bert_dir, tmp_path):
    from transformers import BertModel

    loaded = tm.load_pretrained(tiny_bert_dir, num_classes=3)
    # Pretend fine-tuning changed the weights, then export.
    tuned = jax.tree.map(lambda x: x * 1.5, loaded.params)
    out_dir = tm.save_pretrained(tmp_path / "export", loaded, params=tuned)
    assert (out_dir / "tljax_head.safetensors").is_file()
    ref = BertModel.from_pretrained(out_dir).eval()
    ids, mask = token_batch(2, 6)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    got = loaded.model.apply({"params": tuned}, input_ids=ids, attention_mask=mask)["last_hidden_state"]
    assert max_abs_diff(got, want) <= 1e-4
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tm.save_pretrained(out_dir, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp folder left behind


def test_bf16_checkpoint_loads_into_fp32_or_bf16(tmp_path):
    """Checkpoints stored in bfloat16 (common on the hub) load exactly: fp32 params are the upcast weights."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    BertModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")["encoder.layer.0.attention.self.query.weight"]
    assert stored.dtype == torch.bfloat16
    fp32 = tm.load_pretrained(tmp_path)
    kernel = fp32.params["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert kernel.dtype == np.float32 and np.array_equal(np.asarray(kernel), stored.float().numpy().T)
    half = tm.load_pretrained(tmp_path, dtype="bfloat16")
    assert half.params["encoder"]["layer_0"]["attention"]["query"]["kernel"].dtype == jax.numpy.bfloat16


def test_sharded_safetensors_checkpoint(tiny_bert_dir, tmp_path):
    """A checkpoint split into shards with model.safetensors.index.json (how large hub models are stored)."""
    from transformers import BertModel

    BertModel.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded, single = tm.load_pretrained(tmp_path), tm.load_pretrained(tiny_bert_dir)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), sharded.params, single.params))


def test_invalid_regexes_name_the_pattern(tiny_bert_dir):
    with pytest.raises(CheckpointError, match=r"reinit=: invalid regex '\(pooler': missing \)"):
        tm.load_pretrained(tiny_bert_dir, reinit=["(pooler"])
    with pytest.raises(CheckpointError, match=r"ignore=: invalid regex 'cls\[': unterminated character set"):
        tm.load_pretrained(tiny_bert_dir, ignore=["cls["])


def test_truncated_safetensors_names_the_file(bert_copy):
    weights = bert_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"cannot read {weights}: .* truncated or corrupted"):
        tm.load_pretrained(bert_copy)


def test_hub_id_without_organisation_loads_from_the_cache(monkeypatch, tmp_path, tiny_bert_dir):
    """Regression: `bert-base-uncased` (no org) was taken for a local folder and never looked up in the hub."""
    snap = tmp_path / "models--bert-base-uncased" / "snapshots" / ("b" * 40)
    shutil.copytree(tiny_bert_dir, snap)
    (tmp_path / "models--bert-base-uncased" / "refs").mkdir()
    (tmp_path / "models--bert-base-uncased" / "refs" / "main").write_text("b" * 40)
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert tree.count(tm.load_pretrained("bert-base-uncased").params) == tree.count(
        tm.load_pretrained(tiny_bert_dir).params
    )
    with pytest.raises(CheckpointError, match=r"no local folder .*roberta-base, so 'roberta-base' was taken for a hub"):
        tm.load_pretrained("roberta-base")
    with pytest.raises(CheckpointError, match=r"does not exist \(and 'no such//thing' is not a valid hub id\)"):
        tm.load_pretrained("no such//thing")


def test_sequences_longer_than_the_position_table_are_errors(tiny_bert_dir, tiny_roberta_dir):
    """Regression: an out-of-range position gather gave NaN silently."""
    bert = tm.load_pretrained(tiny_bert_dir)
    ids = np.ones((1, 65), np.int32)
    with pytest.raises(ValueError, match="sequence length 65 exceeds the model's limit of 64 tokens"):
        bert.model.apply(bert.variables, input_ids=ids)
    roberta = tm.load_pretrained(tiny_roberta_dir)  # positions start after pad_token_id=1: 64 - 2 = 62 usable
    with pytest.raises(ValueError, match="sequence length 63 exceeds the model's limit of 62 tokens"):
        roberta.model.apply(roberta.variables, input_ids=np.full((1, 63), 5, np.int32))
    assert np.isfinite(
        roberta.model.apply(roberta.variables, input_ids=np.full((1, 62), 5, np.int32))["last_hidden_state"]
    ).all()


def test_num_layers_keeps_the_first_blocks_like_transformers(tiny_bert_dir, tmp_path):
    """load_pretrained(num_layers=n) = transformers' from_pretrained(num_hidden_layers=n): the same outputs, the
    deeper block reported as ignored, and save_pretrained writes a consistent 1-block checkpoint."""
    from transformers import BertModel

    loaded = tm.load_pretrained(tiny_bert_dir, num_layers=1)
    assert loaded.hf_config.num_hidden_layers == 1
    assert tm.load_pretrained(tiny_bert_dir).hf_config.num_hidden_layers == 2  # the checkpoint's config untouched
    assert len(loaded.report.ignored) == 16 and all(k.startswith("encoder.layer.1.") for k in loaded.report.ignored)
    assert len(loaded.report.loaded) == 39 - 16
    ids, mask = token_batch(3, 7)
    ref = BertModel.from_pretrained(tiny_bert_dir, num_hidden_layers=1).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    got = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)["last_hidden_state"]
    assert max_abs_diff(got, want) <= 1e-5
    with torch.no_grad():  # block 0's output inside the whole model: what feature extraction at layer 0 reads
        whole = BertModel.from_pretrained(tiny_bert_dir).eval()
        block0 = whole(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       output_hidden_states=True).hidden_states[1]  # fmt: skip
    assert max_abs_diff(got, block0) <= 1e-5
    out = tm.save_pretrained(tmp_path / "shallow", loaded)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    again = tm.load_pretrained(out)
    assert again.report.ignored == [] and max_abs_diff(again.model.apply(again.variables, input_ids=ids,
                                                       attention_mask=mask)["last_hidden_state"], got) == 0  # fmt: skip
    same = tm.load_pretrained(tiny_bert_dir, num_layers=2)
    assert same.report.ignored == [] and len(same.report.loaded) == 39


@pytest.mark.parametrize("n", [0, 3, -1, 1.0, True])
def test_num_layers_out_of_range_is_clear(tiny_bert_dir, n):
    with pytest.raises(ValueError, match=r"the checkpoint has 2 blocks; keep 1 to 2"):
        tm.load_pretrained(tiny_bert_dir, num_layers=n)


def test_num_layers_for_a_family_without_truncation_is_clear(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(cfg).save_pretrained(tmp_path / "r")
    with pytest.raises(ValueError, match=r"num_layers is not supported for model_type 'resnet'; it is for \[.*'bert'"):
        tm.load_pretrained(tmp_path / "r", num_layers=1)
