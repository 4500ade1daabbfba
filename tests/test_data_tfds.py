"""TFDS end to end without TensorFlow: prepare array_record files, read them back."""

from __future__ import annotations

import importlib.util
import json

import pytest

from jaxpref.data import DataError, read_preferences
from jaxpref.testing import write_records

tfds_builder = pytest.importorskip("jaxpref.data.tfds_builder")

RECORDS = [
  {"text": ["\n\nHuman: q0\n\nAssistant: yes", "\n\nHuman: q0\n\nAssistant: no"], "score": [1, 0]},
  {"text": ["q1 a", "q1 b"], "score": [1, 1]},  # A tie: skipped and counted.
  {"text": ["q2 a", "q2 b", ""], "score": [0.5, 2.0, -1]},
  {"text": ["q3 a", "q3 b"], "score": [0, 1], "task": "custom"},
]


def test_no_tensorflow_is_needed():
  assert importlib.util.find_spec("tensorflow") is None, "the test is meant to run without TF"


def test_prepare_and_read_back(tmp_path):
  train = write_records(tmp_path / "train.jsonl", RECORDS, layout="lines")
  test = write_records(tmp_path / "test.json", RECORDS[:1])
  out = tfds_builder.prepare_tfds(
    {"train": train, "test": [test]}, tmp_path / "tfds", name="toy", on_tie="skip"
  )
  assert out == tmp_path / "tfds" / "preference_dataset" / "toy" / "1.0.0"
  assert any(p.name.startswith("preference_dataset-train.array_record") for p in out.iterdir())
  metadata = json.loads((out / "metadata.json").read_text())
  assert metadata["summary_train"]["skipped_by_reason"] == {"no_preference": 1}
  assert metadata["summary_train"]["kept"] == 3

  expected, _ = read_preferences(train, on_tie="skip")
  for dataset, kwargs in ((out, {}), ("preference_dataset/toy", {"data_dir": tmp_path / "tfds"})):
    items, summary = tfds_builder.read_tfds(dataset, "train", **kwargs)
    assert summary.kept == summary.read == 3
    assert [(it.texts, it.scores, it.prompt, it.task) for it in items] == [
      (it.texts, it.scores, it.prompt, it.task) for it in expected
    ]
    assert [it.task for it in items] == ["train", "train", "custom"]
    assert items[0].source.startswith("tfds:") and items[0].source.endswith("/train")
  source = tfds_builder.tfds_data_source(out, "test")
  assert len(source) == 1 and set(source[0]) == {
    "texts",
    "scores",
    "prompt",
    "task",
    "source",
    "index",
  }


def test_read_tfds_validates_again(tmp_path):
  path = write_records(tmp_path / "ties.json", RECORDS[1:2])
  out = tfds_builder.prepare_tfds({"train": path}, tmp_path / "tfds", name="ties", on_tie="keep")
  with pytest.raises(DataError, match=r"tfds:preference_dataset/ties/1\.0\.0/train\[record 0\]"):
    tfds_builder.read_tfds(out, "train")
  items, _ = tfds_builder.read_tfds(out, "train", on_tie="keep")
  assert items[0].scores == (1.0, 1.0)
