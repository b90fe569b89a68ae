"""Data for fine-tuning: user files (CSV, JSON lines), the embedded assets, batching."""

from deltatune.data.assets import bbc_news_path, embedded_encoder_path, package_dir
from deltatune.data.augment import AugmentConfig, AugmentedTextDataset, augment_text_dataset
from deltatune.data.loader import SeededSampler, make_loader
from deltatune.data.text import (
    BBC_NEWS,
    DataConfig,
    PadCollator,
    TextExamples,
    TextSplits,
    TokenizedDataset,
    encode_labels,
    load_bbc_news,
    load_examples,
    load_table,
    load_text_splits,
    split_examples,
)

__all__ = [
    "BBC_NEWS",
    "AugmentConfig",
    "AugmentedTextDataset",
    "DataConfig",
    "PadCollator",
    "SeededSampler",
    "TextExamples",
    "TextSplits",
    "TokenizedDataset",
    "augment_text_dataset",
    "bbc_news_path",
    "embedded_encoder_path",
    "encode_labels",
    "load_bbc_news",
    "load_examples",
    "load_table",
    "load_text_splits",
    "make_loader",
    "package_dir",
    "split_examples",
]
