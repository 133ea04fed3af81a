"""Tiny stand-ins for the hub checkpoints that README and the experiment configs name, planted in a local Hugging
Face cache: `load_pretrained("google/vit-base-patch16-224")` then runs the real code path (hub id -> cache)
offline, on a model of the same architecture (and the same preprocessor / tokenizer files) with random weights."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def _vit(folder):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    cfg = ViTConfig(**TINY, image_size=224, patch_size=16)
    cfg.num_labels = 1000  # as the ImageNet checkpoint
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )


def _resnet(folder):
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck")
    cfg.num_labels = 1000
    ResNetForImageClassification(cfg).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(folder)


def _clip(folder):
    """Both towers at CLIP's text length (77) and OpenAI's legacy token ids (eos_token_id 2: pool at the largest id,
    which is `<|endoftext|>`), with a CLIP tokenizer whose vocabulary is that of the model."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = _clip_tokenizer()
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)  # as in openai/clip-vit-base-patch32's config.json
    cfg = CLIPConfig(
        text_config=dict(TINY, vocab_size=len(tokenizer), max_position_embeddings=77, **ids),
        vision_config=dict(TINY, image_size=224, patch_size=32),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _clip_tokenizer():
    """CLIP's tokenizer (lower-cased byte-level BPE with "</w>" word ends) in CLIP's vocabulary layout: the 256 byte
    symbols, the same with "</w>", one token per merge, then `<|startoftext|>` and `<|endoftext|>` as the two largest
    ids. The merges (about 70) are learned from the zero-shot prompts of Fashion-MNIST's class names, so those
    prompts tokenize to words; any other text still tokenizes, byte by byte. OpenAI's vocab.json / merges.txt
    (49408 tokens) are not available offline."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    from tljax.data.images import FASHION_MNIST_LABELS
    from tljax.zero_shot import TEMPLATES, prompts

    clip_rules = CLIPTokenizer().backend_tokenizer  # an empty vocabulary, but CLIP's normalizer and pre-tokenizer
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer, bpe.pre_tokenizer = clip_rules.normalizer, clip_rules.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=4096, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(prompts(FASHION_MNIST_LABELS, TEMPLATES), trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


def _bert(folder):
    """A tiny BERT with the real uncased WordPiece tokenizer (MiniLM's, the same vocabulary as bert-base-uncased)."""
    from transformers import BertConfig, BertModel

    from tljax.assets import minilm_path

    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **TINY)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path()) / name, Path(folder) / name)


STAND_INS = {
    "google/vit-base-patch16-224": _vit,
    "microsoft/resnet-50": _resnet,
    "openai/clip-vit-base-patch32": _clip,
    "bert-base-uncased": _bert,
}


def plant(cache: Path, repo_id: str) -> Path:
    """Lays a stand-in out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<commit>/}."""
    import torch

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(0)
    STAND_INS[repo_id](snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def plant_all(cache: Path) -> Path:
    for repo_id in STAND_INS:
        plant(cache, repo_id)
    return cache
