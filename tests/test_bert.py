"""BERT-family parity with transformers' PyTorch models and shape/param-count checks."""

import numpy as np
import pytest
import torch
from conftest import max_abs_diff, token_batch

import tljax.models as tm
from tljax import tree


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    from transformers import BertModel

    return tm.load_pretrained(tiny_bert_dir), BertModel.from_pretrained(tiny_bert_dir).eval()


def _torch_out(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("batch,length", [(1, 5), (3, 7), (4, 16)])
def test_bert_parity_with_padding(bert, batch, length):
    loaded, ref = bert
    ids, mask = token_batch(batch, length)
    out = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)
    want = _torch_out(ref, ids, mask)
    assert max_abs_diff(out["last_hidden_state"], want.last_hidden_state) <= 1e-4
    assert max_abs_diff(out["pooler_output"], want.pooler_output) <= 1e-4


def test_roberta_parity_positions_skip_padding(tiny_roberta_dir):
    from transformers import RobertaModel

    loaded = tm.load_pretrained(tiny_roberta_dir)
    ref = RobertaModel.from_pretrained(tiny_roberta_dir).eval()
    ids, mask = token_batch(3, 9, pad_id=1)
    out = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)
    assert max_abs_diff(out["last_hidden_state"], _torch_out(ref, ids, mask).last_hidden_state) <= 1e-4


def test_param_count_and_paths_match_hf(bert, tiny_bert_dir):
    loaded, ref = bert
    assert tree.count(loaded.params) == sum(p.numel() for p in ref.parameters())
    paths = tree.paths(loaded.params)
    assert "encoder/layer_1/attention/query/kernel" in paths
    assert "embeddings/word_embeddings/embedding" in paths
    assert loaded.params["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"].shape == (32, 37)


def test_dropout_only_in_train_mode(bert):
    import jax

    loaded, _ = bert
    ids, mask = token_batch(2, 6)
    a = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)["last_hidden_state"]
    b = loaded.model.apply(
        loaded.variables, input_ids=ids, attention_mask=mask, train=True, rngs={"dropout": jax.random.key(0)}
    )["last_hidden_state"]
    assert not np.allclose(a, b)


def test_bf16_compute_close_to_fp32(bert, tiny_bert_dir):
    import jax.numpy as jnp

    loaded, _ = bert
    half = tm.load_pretrained(tiny_bert_dir, dtype="bfloat16")
    assert half.params["encoder"]["layer_0"]["attention"]["query"]["kernel"].dtype == jnp.bfloat16
    ids, mask = token_batch(2, 6)
    a = loaded.model.apply(loaded.variables, input_ids=ids, attention_mask=mask)["last_hidden_state"]
    b = half.model.apply(half.variables, input_ids=ids, attention_mask=mask)["last_hidden_state"]
    assert b.dtype == jnp.bfloat16
    assert max_abs_diff(a, b) < 0.1
