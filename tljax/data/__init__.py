"""The data layer: sources by name, transfer splits, text and image preprocessing, grain pipelines for `engine.fit`.

from tljax import data
train, val = data.carve_validation(data.load("fashion_mnist:train"), 0.1)
train_data = data.TrainData(train, batch_size=64, random_transform=data.train_transform(pre, data.Augment()))
eval_data = data.EvalData(val, batch_size=256, transform=pre)
"""

from tljax.data.augment import Augment, train_transform
from tljax.data.corruptions import CORRUPTIONS, corrupted
from tljax.data.files import DataFileError, text_file
from tljax.data.pipeline import EvalData, TrainData, stack
from tljax.data.records import SourceInfo, SourceUnavailable, Split
from tljax.data.shift import PAIRS, domain_pair
from tljax.data.sources import SOURCES, format_sources, list_sources, load
from tljax.data.splits import EmptySplitError, carve_validation, k_shot, label_halves, label_subset, subsample
from tljax.data.text import TextBatcher
from tljax.data.vision import ImagePreprocess

__all__ = [
    "CORRUPTIONS",
    "PAIRS",
    "SOURCES",
    "Augment",
    "DataFileError",
    "EmptySplitError",
    "EvalData",
    "ImagePreprocess",
    "SourceInfo",
    "SourceUnavailable",
    "Split",
    "TextBatcher",
    "TrainData",
    "carve_validation",
    "corrupted",
    "domain_pair",
    "format_sources",
    "k_shot",
    "label_halves",
    "label_subset",
    "list_sources",
    "load",
    "stack",
    "subsample",
    "text_file",
    "train_transform",
]
