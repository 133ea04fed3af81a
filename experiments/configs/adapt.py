"""Unsupervised domain adaptation on a `tljax.data.shift` pair: source-only, DANN, MMD (DAN) or CORAL.

    python -m experiments.adapt --config experiments/configs/adapt.py:dann              # fashion_mnist_c, 3 seeds
    python -m experiments.adapt --config experiments/configs/adapt.py:source_only --seeds 0
    python -m experiments.adapt --config experiments/configs/adapt.py:coral,wordnet       # MiniLM-L6 on WordNet

The argument is `<method>[,<pair>]`. Default pair `fashion_mnist_c`: clean Fashion-MNIST (labelled, one seeded half
of train) -> gaussian-noise severity-5 Fashion-MNIST (unlabelled, the other half), 10 classes, a small ResNet
(16-128 channels, 0.31M parameters) trained from scratch at 32x32; 6,000 training images per domain, batches of
64 + 64, 300 steps (cosine peak 3e-3), tested on 2,000 clean and 2,000 corrupted test images. A few minutes per
run on 2 CPU cores. Expected target test accuracy over seeds 0-2 (2-core CPU, measured): source_only 0.615 ± 0.028,
dann 0.741 ± 0.012, coral 0.760 ± 0.009, mmd 0.778 ± 0.008; mmd with --config.adapt.weight=0 (CE only, but
BatchNorm statistics over both domains) 0.699 ± 0.009. Source test accuracy 0.83-0.85 for all.

`wordnet`: WordNet definitions -> usage sentences (26 classes) with the offline all-MiniLM-L6-v2, mean pooling,
max_length 32; the bottom four of six blocks frozen (`top_k` 2 + head), 300 steps of 32 + 32. Measured target test
accuracy over seeds 0-2 (README): source_only 0.292 ± 0.005, coral 0.301 ± 0.016, dann 0.109 ± 0.046 (0.236 ± 0.027
with --config.adapt.weight=0.1), mmd 0.097 (features collapse). Other settings, all reported in README: dann λ 0.03
0.291 ± 0.012 (ties source-only), mmd λ 0.1 0.272, coral λ 10 0.277, LR peak 3e-4 (--config.schedule.args.lr.peak)
lowers source-only to 0.269 and dann λ 0.1 to 0.257.
"""

from ml_collections import ConfigDict

from experiments.configs.base import base_config
from tljax.assets import MINILM_HUB_ID

RESNET = {"model_type": "resnet", "num_channels": 3, "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
          "depths": [1, 1, 1, 1], "layer_type": "basic", "hidden_act": "relu"}  # fmt: skip
METHOD_WEIGHTS = {"source_only": 0.0, "dann": 1.0, "mmd": 1.0, "coral": 1.0}


def base_adapt_config() -> ConfigDict:
    """The sections `tljax.adaptation.job` reads (model / schedule / optimizer / engine as `tljax.job`)."""
    base = base_config()
    c = ConfigDict()
    c.name, c.seed = "", 0
    for section in ("model", "schedule", "optimizer", "engine"):
        c[section] = base[section]
    c.data = ConfigDict()
    c.data.pair = "fashion_mnist_c"  # a tljax.data.shift pair
    c.data.corruption = "gaussian_noise"  # fashion_mnist_c only
    c.data.severity = 5
    c.data.train_size = 6000  # per domain (0: all)
    c.data.test_size = 2000  # per domain (0: all)
    c.data.batch_size = 64  # per domain: each step sees batch_size source + batch_size target rows
    c.data.eval_batch_size = 500
    for key in ("max_length", "buckets", "eval_buckets", "group_by_length", "image_size", "augment"):
        c.data[key] = base.data[key]
    c.adapt = ConfigDict()
    c.adapt.method = "source_only"  # source_only | dann | mmd | coral
    c.adapt.weight = 1.0  # lambda: source CE + weight * (domain BCE | MMD^2 | CORAL)
    c.adapt.domain_hidden = (256,)  # dann: the domain classifier's hidden widths (DANN papers: (1024, 1024))
    c.adapt.domain_dropout = 0.5
    c.adapt.kernels = 5  # mmd: Gaussian kernels at bandwidths s * 2^-2 .. s * 2^2 (s: mean squared distance)
    c.adapt.kernel_mul = 2.0
    return c


def fashion_mnist(c: ConfigDict) -> None:
    c.model.config = ConfigDict(RESNET)
    c.data.image_size = 32
    c.schedule.name = "full"
    c.schedule.args = {"steps": 300, "lr": {"schedule": "cosine", "peak": 3e-3, "warmup_steps": 40}}


def wordnet(c: ConfigDict) -> None:
    c.model.name = MINILM_HUB_ID
    c.model.pooling = "mean"
    c.data.train_size = 4000
    c.data.test_size = 1000
    c.data.batch_size = 32
    c.data.eval_batch_size = 256
    c.data.max_length = 32
    c.data.buckets = (32,)
    c.schedule.name = "top_k"  # e.g. --config.schedule.args.lr.peak=3e-4
    c.schedule.args = {"k": 2, "steps": 300, "lr": {"schedule": "cosine", "peak": 1e-3, "warmup_steps": 30}}


PAIRS = {"fashion_mnist_c": fashion_mnist, "wordnet": wordnet}


def get_config(arg=None):
    method, _, pair = (arg or "source_only").partition(",")
    pair = pair or "fashion_mnist_c"
    if method not in METHOD_WEIGHTS:
        raise ValueError(f"adapt config takes <method>[,<pair>] with method in {sorted(METHOD_WEIGHTS)}, got {arg!r}")
    if pair not in PAIRS:
        raise ValueError(f"adapt config: unknown pair {pair!r}; choose one of {sorted(PAIRS)}")
    c = base_adapt_config()
    c.name = f"adapt_{pair}_{method}"
    c.data.pair = pair
    c.adapt.method = method
    c.adapt.weight = METHOD_WEIGHTS[method]
    PAIRS[pair](c)
    return c
