"""The Keras transfer recipe on an image backbone: train a new head on the frozen ResNet-50, then thaw the top
stage and continue at a 100x smaller learning rate (BatchNorm of frozen stages stays in inference mode, Keras'
rule). Fashion-MNIST, validation carved from train.

    python -m experiments.finetune --config experiments/configs/keras_recipe.py --workdir runs/keras

Needs the hub checkpoint; 64x64 inputs keep it tractable on a CPU (`--config.data.image_size=224` on a GPU).
"""

from experiments.configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "keras_recipe_resnet50"
    c.model.name = "microsoft/resnet-50"
    c.model.pooling = "pooler"
    c.model.reinit = [r"^head/"]
    c.data.train = "fashion_mnist:train"
    c.data.test = "fashion_mnist:test"
    c.data.image_size = 64
    c.data.train_size = 12000
    c.data.augment.flip = True
    c.schedule.name = "keras_recipe"
    c.schedule.args = {"head_steps": 300, "finetune_steps": 600, "lr": 1e-3, "top_n": 1, "lr_div": 100.0}
    return c
