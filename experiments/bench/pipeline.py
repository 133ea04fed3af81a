"""`pipeline`: the input pipeline must never be the bottleneck. For the default text task (real MiniLM-L6 tokenizer on
`wordnet_lexnames`, batch 32, max length 64 with length buckets) and Fashion-MNIST with augmentation (random
resized crop, flip, RandAugment n=2 m=9 to 224x224, ImageNet normalisation; batch 32), this prints the pipeline's
examples/s (grain, the same `TrainData` as the training jobs), the train step's consumption rate on the same
machine (examples/s of the fastest step of each job, the linear-probe step, so the ratio is the worst case), and
their ratio `pipeline_over_step` (goal >= 5).

The text step is MiniLM-L6 on the pipeline's own batches; the image step is a ViT-B/16-sized model (random
weights: no image checkpoint ships offline) at 224x224. `--quick` uses tiny models and fewer batches.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import tljax.models as tm
from experiments.bench.common import emit, scratch_dir, time_fn, tiny_bert_dir
from tljax import data, rules, task
from tljax import partition as P
from tljax.assets import minilm_path
from tljax.step import init_state, make_train_step


def examples_per_second(train: data.TrainData, batches: int) -> float:
    """Pipeline throughput: batches drawn from `train(0)` after a warm-up batch."""
    it = train(0)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * train.batch_size / (time.perf_counter() - t)


def probe_step_rate(loaded, batch, reps: int) -> float:
    """Examples/s of a linear-probe training step (head only: the cheapest step a job runs) on `batch`."""
    unused = task.unused_params(loaded.model, loaded.params, batch)
    part = P.build(loaded.params, rules.linear_probe(loaded), learning_rate=1e-3, unused=unused)
    step = jax.jit(make_train_step(loaded.model, part), donate_argnums=0)
    holder = {"state": init_state(jax.tree.map(jnp.copy, loaded.params), part.tx, loaded.state)}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    return len(batch["labels"]) / time_fn(run, reps=reps)


def text_job(quick: bool) -> list[dict]:
    folder = tiny_bert_dir() if quick else str(minilm_path())
    tokenizer = tm.load_tokenizer(minilm_path())  # the real tokenizer either way
    train = data.TrainData(
        data.load("wordnet_lexnames:train"), batch_size=32, seed=0, collate=data.TextBatcher(tokenizer, 64)
    )
    rate = examples_per_second(train, 20 if quick else 200)
    loaded = tm.load_pretrained(folder, num_classes=26, pooling="mean")
    widths = [train.batch(s)["input_ids"].shape[1] for s in range(20)]
    batch = _most_common_width(train, 20)
    batch["input_ids"] = np.minimum(batch["input_ids"], loaded.hf_config.vocab_size - 1)
    step = probe_step_rate(loaded, batch, 3 if quick else 5)
    common = {"task": "wordnet_lexnames", "model": "tiny-bert" if quick else "all-MiniLM-L6-v2", "batch": 32,
              "buckets": list(train.collate.buckets), "median_width": int(np.median(widths))}  # fmt: skip
    return _emit("pipeline/text", rate, step, common)


def _most_common_width(train: data.TrainData, n: int) -> dict:
    """A batch of the most common bucket among the first n steps: the step the pipeline feeds most often."""
    batches = [train.batch(s) for s in range(n)]
    widths = [b["input_ids"].shape[1] for b in batches]
    common = max(set(widths), key=widths.count)
    return dict(next(b for b in batches if b["input_ids"].shape[1] == common))


def image_job(quick: bool) -> list[dict]:
    size = 32 if quick else 224
    pre = data.ImagePreprocess(size=size)
    aug = data.Augment(randaugment_n=2, randaugment_m=9)
    train = data.TrainData(
        data.load("fashion_mnist:train"), batch_size=32, seed=0, random_transform=data.train_transform(pre, aug)
    )
    rate = examples_per_second(train, 10 if quick else 60)
    loaded = _random_vit(size, quick)
    step = probe_step_rate(loaded, dict(train.batch(0)), 2 if quick else 3)
    common = {"task": "fashion_mnist+randaugment", "model": "tiny-vit" if quick else "vit-b16-sized (random)",
              "batch": 32, "image_size": size}  # fmt: skip
    return _emit("pipeline/image", rate, step, common)


def _random_vit(size: int, quick: bool):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37) if quick else {}
    folder = scratch_dir("tljax-bench-vit-")
    ViTModel(ViTConfig(image_size=size, patch_size=16, **shape)).save_pretrained(folder)
    return tm.load_pretrained(folder, num_classes=10)


def _emit(name: str, rate: float, step: float, common: dict) -> list[dict]:
    return [
        emit(name, "pipeline_examples_per_s", rate, **common),
        emit(name, "probe_step_examples_per_s", step, **common),
        emit(name, "pipeline_over_step", rate / step, target=">= 5", **common),
    ]


def run(quick: bool) -> list[dict]:
    return text_job(quick) + image_job(quick)
