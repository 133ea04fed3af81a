"""Few-shot and zero-shot classification on frozen features: N-way K-shot episodes drawn from the test split,
classifiers fitted on each support set (prototype, kNN, logistic regression; optionally the backbone fine-tuned on
it), mean query accuracy +- 95% CI; and zero-shot classification from class names.

    python -m experiments.fewshot --config experiments/configs/fewshot.py:text     # MiniLM-L6, WordNet, offline
    python -m experiments.fewshot --config experiments/configs/fewshot.py:text --config.fewshot.finetune.episodes=5
    python -m experiments.fewshot --config experiments/configs/fewshot.py:clip     # CLIP B/32 image embeds, F-MNIST

`text` (the default): all-MiniLM-L6-v2 mean-pooled features of WordNet noun definitions (`wordnet_lexnames`), 600
episodes of 5-way 1-shot and 5-shot with 15 queries per class, from the 24 test classes with at least 20 examples
(noun.Tops has 5 and noun.motive 1). Features are SimpleShot's CL2N: centred on the mean feature of 2,600 training
definitions (their labels are not used), then L2-normalised. Zero-shot: MiniLM embeddings of the label words
("noun.animal" -> "animal") in 5 templates, scored over the whole test split (26 classes) and on the same episodes
(each restricted to its 5 classes). Measured (2-core CPU, shared; the table is in README, "Few-shot"):
5-way 1-shot prototype 0.561 ± 0.009, 5-shot 0.737 ± 0.007 (logistic 0.555 / 0.741, 1-NN 0.561 / 0.687); zero-shot
on the same episodes 0.66, over all 26 classes 0.404; LP-FT on the support set (20 episodes) 0.571 / 0.749 against
the frozen prototype 0.569 / 0.734 on the same episodes.

`clip`: the same protocol over CLIP ViT-B/32 `image_embeds` of Fashion-MNIST (the embeddings of
clip_zero_shot.py / clip_probe.py), i.e. CLIP as a K-shot linear probe / prototype classifier; needs the hub
checkpoint, not measured here. The text zero-shot is off (CLIP's is clip_zero_shot.py).

The job sections (model, data, probe) are those of `tljax.job` in mode "probe": features of train / validation /
test are extracted once and cached under <workdir>/features. Section `fewshot`:
  split            the labelled split episodes are drawn from ("test": held-out data, the standard choice)
  n_way, shots, n_query, episodes, seed     episode sizes (one result per K in `shots`); the same seed, the same
                   episodes for every classifier
  transform        "cl2n" (centre on the train features' mean, then L2-normalise), "l2n", or "none"
  classifiers      dicts {"name": prototype | knn | logistic, ...its options}: metric, k, l2 (None: 1 / (N*K))
  text_zero_shot   True: class-name zero-shot with the same encoder (templates / class_names: section zero_shot;
                   [] : tljax.text_zero_shot.TEMPLATES and the label words)
  finetune         episodes (0: off; the first ones of each K), schedule name + args (tljax.freezing), batch_size
                   (0: the whole support set per step): the backbone fine-tuned with `engine.fit` on the support set
"""

from ml_collections import ConfigDict

from experiments.configs import clip_probe
from experiments.configs.base import base_config
from tljax.assets import MINILM_HUB_ID

CLASSIFIERS = [
    {"name": "prototype", "metric": "euclidean"},
    {"name": "knn", "k": 1, "metric": "cosine"},
    {"name": "logistic"},
]


def fewshot_section(text_zero_shot: bool) -> ConfigDict:
    return ConfigDict({
        "split": "test", "n_way": 5, "shots": [1, 5], "n_query": 15, "episodes": 600, "seed": 0,
        "transform": "cl2n", "classifiers": CLASSIFIERS, "text_zero_shot": text_zero_shot,
        "finetune": {"episodes": 0, "batch_size": 0, "schedule": "lp_ft",
                     "args": {"probe_steps": 20, "ft_steps": 10, "probe_lr": 1e-2, "ft_lr": 3e-5}},
    })  # fmt: skip


def text() -> ConfigDict:
    c = base_config()
    c.name = "fewshot_minilm_wordnet"
    c.mode = "probe"  # the job extracts (and caches) frozen features; experiments/fewshot.py runs the episodes
    c.model.name = MINILM_HUB_ID
    c.model.pooling = "mean"  # sentence-transformers' pooling for this checkpoint
    c.data.train = "wordnet_lexnames:train"
    c.data.validation = "wordnet_lexnames:validation"
    c.data.test = "wordnet_lexnames:test"
    c.data.train_size = 2600  # unlabelled: only their mean feature is used (CL2N's centre)
    c.data.validation_size = 260  # unused by the episodes; the job always has a validation split
    c.data.max_length = 64
    c.fewshot = fewshot_section(text_zero_shot=True)
    return c


def clip() -> ConfigDict:
    c = clip_probe.get_config()
    c.name = "fewshot_clip_b32_fashion_mnist"
    c.data.train_size = 2000  # CL2N's centre
    c.data.validation_size = 200
    c.fewshot = fewshot_section(text_zero_shot=False)
    return c


VARIANTS = {"text": text, "clip": clip}


def get_config(arg=None):
    name = arg or "text"
    if name not in VARIANTS:
        raise ValueError(f"unknown few-shot config {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]()
