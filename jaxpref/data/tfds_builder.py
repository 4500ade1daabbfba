"""Preference data as TFDS datasets in array_record files, written and read without TensorFlow.

`prepare_tfds` runs a `tfds.core.GeneratorBasedBuilder` over our files (every record validated
by `read_preferences`) and writes `array_record` shards plus TFDS metadata; `read_tfds` reads
any such prepared dataset back through `tfds.data_source` (random access, no TensorFlow) and
validates it again as preference items. Any TFDS dataset whose features follow one of our
formats (`text`/`score`, `chosen`/`rejected`, ...) can be read the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxpref.data import reader, sources
from jaxpref.data.records import DataSummary, PreferenceItem

_VERSION = "1.0.0"


class PreferenceDataset(tfds.core.GeneratorBasedBuilder):
  """Preference items: `texts`, `scores` (higher preferred), `prompt`, `task`, `source`, `index`.

  Each config (its name chosen by the caller) holds the splits given to `prepare_tfds`. The
  examples keep file order (`disable_shuffling`), and the read summary of every split (records
  read, kept, skipped by reason) is stored in the dataset's metadata.
  """

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "Items validated by jaxpref.data.read_preferences."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup touches `importlib_resources`, which its package requires only on
    # Python < 3.9 and which is therefore missing here; the answer is simply this file.
    return epath.Path(__file__)

  def __init__(
    self,
    *,
    files: Mapping[str, Sequence[str]] | None = None,
    read_kwargs: Mapping[str, Any] | None = None,
    **kwargs,
  ):
    self._files = {k: list(v) for k, v in (files or {}).items()}
    self._read_kwargs = dict(read_kwargs or {})
    self._summaries: dict[str, dict[str, Any]] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Preference comparisons: N >= 2 texts with a score each.",
      features=tfds.features.FeaturesDict(
        {
          "texts": tfds.features.Sequence(tfds.features.Text()),
          "scores": tfds.features.Tensor(shape=(None,), dtype=np.float32),
          "prompt": tfds.features.Text(),
          "task": tfds.features.Text(),
          "source": tfds.features.Text(),
          "index": np.int64,
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    return {split: self._generate_examples(split, paths) for split, paths in self._files.items()}

  def _generate_examples(self, split: str, paths: Sequence[str]) -> Iterator[tuple[str, dict]]:
    items, summary = reader.read_many(paths, **self._read_kwargs)
    self.info.metadata[f"summary_{split}"] = summary.to_dict()
    for n, item in enumerate(items):
      yield (
        f"{n:09d}",
        {
          "texts": list(item.texts),
          "scores": np.asarray(item.scores, np.float32),
          "prompt": item.prompt,
          "task": item.task,
          "source": item.source,
          "index": item.index,
        },
      )


def prepare_tfds(
  files: Mapping[str, str | Path | Sequence[str | Path]],
  data_dir: str | Path,
  *,
  name: str,
  **read_kwargs,
) -> Path:
  """Writes preference files as a TFDS dataset of array_record files; returns its directory.

  Args:
    files: split name -> file or files, e.g. `{"test": "helpful.json"}`.
    data_dir: TFDS data directory; the dataset goes to
      `<data_dir>/preference_dataset/<name>/<version>`.
    name: the builder config name (e.g. `helpful`).
    **read_kwargs: passed to `read_preferences` (format, on_error, on_tie, task, ...).
  """
  by_split = {
    split: [str(p)] if isinstance(p, str | Path) else [str(x) for x in p]
    for split, p in files.items()
  }
  builder = PreferenceDataset(
    files=by_split,
    read_kwargs=read_kwargs,
    data_dir=str(data_dir),
    config=tfds.core.BuilderConfig(name=name),
    file_format="array_record",
  )
  builder.download_and_prepare()
  return Path(builder.data_dir)


def tfds_data_source(dataset: str | Path, split: str, *, data_dir: str | Path | None = None):
  """The random-access `tfds` data source of a prepared dataset (no TensorFlow needed).

  Args:
    dataset: a prepared dataset's directory (holding `dataset_info.json`), or a TFDS name such
      as `preference_dataset/helpful` found in `data_dir`.
    split: split name (TFDS slicing such as `test[:10%]` works too).
    data_dir: TFDS data directory for a name.
  """
  path = Path(dataset)
  if (path / "dataset_info.json").is_file():
    return tfds.builder_from_directory(str(path)).as_data_source(split=split)
  return tfds.data_source(str(dataset), split=split, data_dir=str(data_dir) if data_dir else None)


def _plain(value: Any) -> Any:
  """A TFDS-decoded value as JSON-like Python (bytes -> str, arrays -> lists)."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value


def read_tfds(
  dataset: str | Path, split: str, *, data_dir: str | Path | None = None, **read_kwargs
) -> tuple[list[PreferenceItem], DataSummary]:
  """Reads a prepared TFDS split as validated preference items.

  Records with our features (`texts`, `scores`, `prompt`, `task`) keep their task; any other
  dataset is read through the usual format detection of its decoded features.

  Args:
    dataset, split, data_dir: as for `tfds_data_source`.
    **read_kwargs: as for `read_preferences` (on_error, on_tie, format, task, ...).
  """
  source = tfds_data_source(dataset, split, data_dir=data_dir)
  path = Path(dataset)
  # A prepared directory is <data_dir>/<name>/<config>/<version>.
  name = "/".join(path.resolve().parts[-3:]) if path.is_dir() else str(dataset)
  label = f"tfds:{name}/{split}"

  def records() -> Iterator[sources.RawRecord]:
    for i in range(len(source)):
      value = _plain(source[i])
      if isinstance(value, dict) and "texts" in value and "scores" in value:
        value = {"text": value.pop("texts"), "score": value.pop("scores"), **value}
      yield sources.RawRecord(f"{label}[record {i}]", i, value=value)

  if path.is_dir():
    default_task = path.resolve().parts[-2]
  else:  # `name/config:version` -> config.
    default_task = str(dataset).split("/")[-1].split(":")[0]
  return reader.read_records(records(), source=label, default_task=default_task, **read_kwargs)
