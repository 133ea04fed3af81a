"""Every key `tljax.job` reads, with its default. Configs start from `base_config()` and change what they need.

Sequences are tuples, which the command line can set (`--config.data.classes='(0,1)'`, or the flag repeated); a
config file may assign a list, which ml_collections stores as a tuple."""

from ml_collections import ConfigDict, FieldReference


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.name = ""  # a label for tables and sweeps
    c.seed = 0
    c.mode = "finetune"  # or "probe": features of the frozen backbone (cached) + L2 logistic regression

    c.model = ConfigDict()
    c.model.name = ""  # hub id or local folder
    c.model.pooling = FieldReference(None, field_type=str)  # None: the checkpoint head's or the family default
    c.model.head_hidden = 0  # a hidden tanh layer in the head (0: linear)
    c.model.head_dropout = 0.0
    c.model.reinit = ()  # regexes of parameters to initialise fresh, e.g. (r"^head/",) for a checkpoint's own head
    c.model.dtype = "float32"  # compute dtype; "bfloat16" with param_dtype "float32" for mixed precision
    c.model.param_dtype = FieldReference(None, field_type=str)
    c.model.num_layers = 0  # keep the first n blocks of the checkpoint (0: all), e.g. fine-tuning from a middle layer
    c.model.options = ConfigDict()  # family options, e.g. image_size for ViT / CLIP position resampling
    # instead of name: train from scratch, an HF config as a dict with model_type (tljax.models.from_config)
    c.model.config = ConfigDict()
    # PEFT methods woven into the backbone (tljax.peft), e.g. ({"method": "lora", "rank": 8, "alpha": 16},); the rule
    # set / schedule "peft" trains them and the head. () : none
    c.model.peft = ()

    c.data = ConfigDict()
    c.data.train = ""  # "source:split", see tljax.data.sources
    c.data.validation = ""  # "" : carve validation_fraction out of train (stratified)
    c.data.test = ""  # "" : no test evaluation
    # file: sources (CSV / TSV header, JSONL keys): the columns holding the text and the label, e.g. "sentence" for
    # GLUE's CSVs; label_names: train's label space in class order (() : from its labels), e.g. ("1", "2", "3") for
    # 1-based integer labels. Validation and test are read in train's label space, so either may lack a class.
    c.data.text_column = "text"
    c.data.label_column = "label"
    c.data.label_names = ()
    c.data.validation_fraction = 0.1
    c.data.train_size = 0  # 0: all; else a stratified subsample of train
    c.data.validation_size = 0
    c.data.test_size = 0
    c.data.kshot = 0  # k examples per class from train (few-shot transfer)
    c.data.classes = ()  # a label subset (names or indices), relabelled in this order
    c.data.batch_size = 32  # global
    c.data.eval_batch_size = 256
    c.data.max_length = 128  # text: tokens, truncation
    c.data.buckets = ()  # text: padded lengths in training (() : max_length/4, /2, max_length)
    c.data.group_by_length = False  # text: batches of similar token counts (less padding; HF's group_by_length)
    c.data.eval_buckets = ()  # text: padded lengths in evaluation (() : every 8 tokens up to max_length)
    c.data.image_size = 0  # images: 0 = the checkpoint's preprocessor size
    c.data.augment = ConfigDict(
        {"random_resized_crop": False, "flip": False, "randaugment_n": 0, "randaugment_m": 9,
         "mixup_alpha": 0.0, "cutmix_alpha": 0.0}
    )  # fmt: skip
    c.data.seed = c.get_ref("seed")  # follows --config.seed unless set

    c.schedule = ConfigDict()
    c.schedule.name = "lp_ft"  # a built-in of tljax.freezing (lp_ft, full, linear_probe, gradual_unfreeze, ...)
    c.schedule.args = ConfigDict()  # its arguments
    c.schedule.phases = ()  # or explicit phases: ({"steps": 100, "rules": "linear_probe", "learning_rate": 1e-3},)

    # mode "probe": which features (layer None: the final output; i: block i, negative from the top) and the L2
    # strengths tried (chosen on validation accuracy; () : tljax.probes.DEFAULT_L2_GRID)
    c.probe = ConfigDict({"layer": FieldReference(None, field_type=int), "pooling": "", "l2_grid": ()})
    # mode "zero_shot" (CLIP): prompt templates with "{}" (() : tljax.zero_shot.TEMPLATES) and one name per class in
    # label order (() : the data's label names, e.g. ("t-shirt", "trouser", ...) instead of "T-shirt/top", ...)
    c.zero_shot = ConfigDict({"templates": (), "class_names": ()})

    c.optimizer = ConfigDict({"optimizer": "adamw", "weight_decay": 0.01, "clip_norm": 1.0})
    c.loss = ConfigDict({"label_smoothing": 0.0})

    c.engine = ConfigDict()
    c.engine.parallel = "data"
    c.engine.accumulate = 1
    c.engine.log_every = 10
    c.engine.eval_every = 0  # 0: evaluate at phase ends only
    # best_metric "": none (the final state is the selected model); else the best validation checkpoint is
    c.engine.checkpoint = ConfigDict({"every": 0, "keep": 2, "best_metric": "", "best_mode": "max"})
    # patience 0: off; else stop the final phase after `patience` evaluations without improvement
    c.engine.early_stopping = ConfigDict({"metric": "accuracy", "mode": "max", "patience": 0, "min_delta": 0.0})
    c.engine.frozen_batchnorm = "inference"
    # min_blocks 0: off; else phases freezing >= min_blocks bottom blocks train from their cached outputs
    # (tljax.prefix_cache; un-augmented data only); directory "": in memory, else on disk under data_key
    c.engine.prefix_cache = ConfigDict({"min_blocks": 0, "directory": "", "data_key": ""})
    # a penalty toward the pretrained model (tljax.regularizers): name "" off, "l2_sp" (alpha toward w0 on the
    # transferred weights, beta toward 0 on the head and PEFT leaves; use optimizer.weight_decay 0) or "delta"
    # (alpha times the block-output distance to the pretrained model; layers: block indices, () all)
    c.engine.regularizer = ConfigDict({"name": "", "alpha": 0.01, "beta": 0.01, "layers": ()})
    return c
