"""CLIP ViT-B/32 zero-shot on Fashion-MNIST: class embeddings from prompts (7 templates x 10 class names, ensembled
as in the CLIP paper), test images scored against them; nothing is trained.

    python -m experiments.finetune --config experiments/configs/clip_zero_shot.py --workdir runs/clip_zero_shot
    python -m experiments.finetune --config experiments/configs/clip_zero_shot.py:labels   # the raw label names

Needs the hub checkpoint (openai/clip-vit-base-patch32, with its tokenizer). Expected test accuracy: not measured
here, and no published figure for this model on Fashion-MNIST was checked; the linear probe (clip_probe.py) is the
number to compare with. The class names below are the labels written as a photo caption would ("t-shirt" for
"T-shirt/top"); `:labels` keeps the dataset's label names. `--config.zero_shot.templates` replaces the templates
(default: tljax.zero_shot.TEMPLATES). The job still loads the train split (it defines the label space): a small
stratified sample suffices.
"""

from experiments.configs import clip_probe

CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def get_config(arg=None):
    if arg not in (None, "labels"):
        raise ValueError(f"clip_zero_shot.py takes no argument or 'labels', got {arg!r}")
    c = clip_probe.get_config()  # the same model, data and test split as the linear probe it is compared with
    c.name = "fashion_mnist_clip_b32_zero_shot"
    c.mode = "zero_shot"
    c.data.train_size = 100  # unused by zero-shot, but the job builds a train pipeline
    c.zero_shot.class_names = [] if arg == "labels" else list(CLASS_NAMES)
    return c
