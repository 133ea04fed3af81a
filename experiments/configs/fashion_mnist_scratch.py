"""A small ResNet (4 basic stages of one block, 16-128 channels, 0.31M parameters) trained from scratch on five
Fashion-MNIST classes at 32x32: the pre-training runs of the A/B transfer experiment (sweeps/transfer_ab.py).

    python -m experiments.finetune --config experiments/configs/fashion_mnist_scratch.py:A --workdir runs/fm_A

The argument picks the classes: "A" (default) = Coat, Shirt, Pullover, Sneaker, Dress; "B" = Sandal, Ankle boot,
T-shirt/top, Bag, Trouser: a random split of the ten classes (numpy's default_rng(0).permutation(10), halved), as
Yosinski et al. (2014) split ImageNet into random halves. Validation: 10% carved from train; test: the official
test images of the same classes. No augmentation (the frozen-prefix cache serves the transfer runs).
"""

from ml_collections import ConfigDict

from experiments.configs.base import base_config

CLASSES = {"A": [4, 6, 2, 7, 3], "B": [5, 9, 0, 8, 1]}
RESNET = {"model_type": "resnet", "num_channels": 3, "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
          "depths": [1, 1, 1, 1], "layer_type": "basic", "hidden_act": "relu"}  # fmt: skip


def get_config(arg=None):
    half = arg or "A"
    if half not in CLASSES:
        raise ValueError(f"fashion_mnist_scratch takes A or B, got {half!r}")
    c = base_config()
    c.name = f"fashion_mnist_{half}_scratch"
    c.model.config = ConfigDict(RESNET)
    c.data.train = "fashion_mnist:train"
    c.data.test = "fashion_mnist:test"
    c.data.classes = CLASSES[half]
    c.data.image_size = 32
    c.data.batch_size = 128
    c.data.eval_batch_size = 500
    c.schedule.name = "full"
    c.schedule.args = {"steps": 300, "lr": {"schedule": "cosine", "peak": 3e-3, "warmup_steps": 50}}
    return c
