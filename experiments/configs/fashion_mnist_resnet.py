"""ResNet-50 (ImageNet, microsoft/resnet-50) fine-tuned on Fashion-MNIST (Debian dataset-fashion-mnist) with LP-FT,
random resized crops and flips; validation carved from train (10%), the official 10k test split.

    python -m experiments.finetune --config experiments/configs/fashion_mnist_resnet.py --workdir runs/fm_resnet

Needs the hub checkpoint (network once, then the HF cache) and an accelerator for 224x224 in reasonable time
(`--config.data.image_size=64` runs on a CPU). Expected on a GPU: ~0.93-0.94 test accuracy after 2 epochs
(not measured here: no accelerator was lent; README lists what was).
"""

from experiments.configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "fashion_mnist_resnet50_lpft"
    c.model.name = "microsoft/resnet-50"
    c.model.pooling = "pooler"
    c.model.reinit = [r"^head/"]  # the checkpoint's own ImageNet head is replaced by a 10-way one
    c.data.train = "fashion_mnist:train"
    c.data.test = "fashion_mnist:test"
    c.data.batch_size = 64
    c.data.augment.random_resized_crop = True
    c.data.augment.flip = True
    c.schedule.name = "lp_ft"
    c.schedule.args = {"probe_steps": 200, "ft_steps": 1600, "probe_lr": 1e-2,
                       "ft_lr": {"schedule": "cosine", "peak": 1e-3, "warmup_steps": 100}}  # fmt: skip
    c.optimizer.weight_decay = 1e-4
    c.engine.eval_every = 400
    c.engine.checkpoint.best_metric = "accuracy"
    return c
