"""BERT-base sentiment on IMDB reviews from TFDS: full fine-tuning, sequences of 256 tokens (a TPU VM / GPU job).

    python -m experiments.finetune --config experiments/configs/tfds_imdb_bert.py --workdir runs/imdb_bert

Needs the network (bert-base-uncased; `tfds build imdb_reviews --file_format=array_record` once). Expected:
~0.92-0.93 test accuracy (Sun et al. 2019 report 0.94 at 512 tokens); not measured here.
"""

from experiments.configs.base import base_config


def get_config(arg=None):
    c = base_config()
    c.name = "imdb_bert_base"
    c.model.name = "bert-base-uncased"
    c.model.pooling = "pooler"  # BertForSequenceClassification's head: the export loads there
    c.data.train = "tfds:imdb_reviews:train"
    c.data.test = "tfds:imdb_reviews:test"
    c.data.max_length = 256
    c.data.batch_size = 32
    c.schedule.name = "full"
    c.schedule.args = {"steps": 2000, "lr": {"schedule": "linear", "init": 2e-5, "end": 0.0}}
    c.engine.eval_every = 500
    c.engine.checkpoint.best_metric = "accuracy"
    return c
