"""CLIP ViT-B/32 image embeddings as frozen features for Fashion-MNIST: the linear-probe protocol of the CLIP paper
(L2 logistic regression, strength chosen on validation), features cached in the work directory.

    python -m experiments.finetune --config experiments/configs/clip_probe.py --workdir runs/clip_probe

Needs the hub checkpoint (openai/clip-vit-base-patch32). Expected ~0.90 test accuracy (not measured here).
"""

from experiments.configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "fashion_mnist_clip_b32_probe"
    c.mode = "probe"
    c.model.name = "openai/clip-vit-base-patch32"
    c.model.pooling = "image_embeds"
    c.data.train = "fashion_mnist:train"
    c.data.test = "fashion_mnist:test"
    c.data.train_size = 10000
    c.data.validation_size = 2000
    return c
