"""Every Python block in README.md runs as written: in order, in one namespace, offline, in a temporary directory.
Hub ids in the blocks are answered from a local Hugging Face cache holding tiny checkpoints of the same
architectures, so `load_pretrained("google/vit-base-patch16-224")` runs the real code path (hub id -> cache)."""

import hashlib
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _tiny_vit_classifier(folder):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=16
    )
    cfg.num_labels = 1000  # as the ImageNet checkpoint
    ViTForImageClassification(cfg).save_pretrained(folder)


def _tiny_bert(folder):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    BertModel(cfg).save_pretrained(folder)


HUB_IDS = {"google/vit-base-patch16-224": _tiny_vit_classifier, "bert-base-uncased": _tiny_bert}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def plant(cache, repo_id: str, write) -> None:
    """Lays a checkpoint out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(0)
    write(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_readme_hub_ids_are_planted():
    named = re.findall(r"load_pretrained\(\s*\"([^\"]+)\"", "\n".join(python_blocks(README.read_text())))
    ids = {n for n in named if not n.endswith("/")}  # "export/": a folder the blocks write themselves
    assert ids <= set(HUB_IDS), f"add a tiny checkpoint for {sorted(ids - set(HUB_IDS))} to HUB_IDS"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for repo_id, write in HUB_IDS.items():
        plant(cache, repo_id, write)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102 - our own README
        except Exception as e:
            pytest.fail(f"README python block {i} ({code.splitlines()[0]!r}) fails: {type(e).__name__}: {e}")
