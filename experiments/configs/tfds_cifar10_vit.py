"""ViT-B/16 on CIFAR-10 from TFDS (a TPU VM / GPU job): LP-FT at 224x224 with random resized crops and flips.

    python -m experiments.finetune --config experiments/configs/tfds_cifar10_vit.py --workdir gs://bucket/cifar10

Needs the network (the hub checkpoint; `tfds build cifar10 --file_format=array_record` once, see tljax.data.tfds).
Expected: ~0.98-0.99 test accuracy (ViT-B/16 transfer, Dosovitskiy et al. 2021); not measured here.
"""

from experiments.configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "cifar10_vit_b16_lpft"
    c.model.name = "google/vit-base-patch16-224"
    c.model.pooling = "cls"
    c.model.reinit = [r"^head/"]
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.data.train = "tfds:cifar10:train"
    c.data.test = "tfds:cifar10:test"
    c.data.batch_size = 512
    c.data.eval_batch_size = 1024
    c.data.augment.random_resized_crop = True
    c.data.augment.flip = True
    c.schedule.name = "lp_ft"
    c.schedule.args = {"probe_steps": 500, "ft_steps": 2500, "probe_lr": 1e-2,
                       "ft_lr": {"schedule": "cosine", "peak": 3e-4, "warmup_steps": 200}}  # fmt: skip
    c.optimizer.weight_decay = 0.05
    c.engine.eval_every = 500
    c.engine.checkpoint.every = 500
    c.engine.checkpoint.best_metric = "accuracy"
    return c
