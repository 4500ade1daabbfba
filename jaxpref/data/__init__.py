"""Preference data: reading every common format, validation, splits, tokenisation, batching.

`jaxpref.data.tfds_builder` (TFDS preparation/reading) is imported on demand: it pulls in
tensorflow_datasets.
"""

from jaxpref.data.errors import DataConfigError, DataError
from jaxpref.data.eval_batches import EvalBatches, build_eval_batches
from jaxpref.data.formats import DSP_DOMAINS, FORMATS, PAPER_TEMPLATE, TRL_TEMPLATE
from jaxpref.data.mixing import MixingPlan
from jaxpref.data.pipeline import PreferenceBatchIterator, build_train_pipeline
from jaxpref.data.reader import ON_ERROR, ON_TIE, read_many, read_preferences
from jaxpref.data.records import DataSummary, PreferenceItem, group_by_task
from jaxpref.data.splits import split_items
from jaxpref.data.tokenize import (
  TokenizedItems,
  TokenizeOptions,
  bucket_length,
  collate,
  length_buckets,
  load_tokenizer,
  tokenize_items,
)

__all__ = [
  "DSP_DOMAINS",
  "FORMATS",
  "ON_ERROR",
  "ON_TIE",
  "PAPER_TEMPLATE",
  "TRL_TEMPLATE",
  "DataConfigError",
  "DataError",
  "DataSummary",
  "EvalBatches",
  "MixingPlan",
  "PreferenceBatchIterator",
  "PreferenceItem",
  "TokenizeOptions",
  "TokenizedItems",
  "bucket_length",
  "build_eval_batches",
  "build_train_pipeline",
  "collate",
  "group_by_task",
  "length_buckets",
  "load_tokenizer",
  "read_many",
  "read_preferences",
  "split_items",
  "tokenize_items",
]
