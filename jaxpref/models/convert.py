"""Hugging Face <-> jaxpref tensor conversion driven by one table per architecture.

A table is a sequence of `Tensor(hf, path, layout)`: the Hugging Face tensor name (under the base
model prefix; `{i}` stands for the layer, `{e}` for the expert), the parameter path inside
`params["backbone"]` ("/"-separated) and how the weight is laid out. The same table converts in
both directions. Entries whose parameter the config does not have (biases, q/k norms) are
skipped; a parameter with no entry is an error, so a table cannot silently miss a weight.

Layouts (HF `nn.Linear` weights are [out, in]; jaxpref kernels [in..., out...]):
  "copy"     same shape (embeddings).
  "flat"     HF holds the parameter flattened (norm scales, biases, split per head here).
  "linear"   kernel [in, out...] <-> weight [prod(out), in].
  "linear2"  kernel [in1, in2, out] <-> weight [out, in1 * in2] (attention output projections).
Parameters under `layers/` carry a leading layer axis (`{i}`); a `{e}` adds an expert axis after it.

This module imports no architecture: `registry` imports the architectures, which import this.
It is a little over 400 lines because the table, its three uses (load, sliced load, save) and the
`Arch` record that binds them belong together.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxpref.models.config import ModelConfig

Tensors = Mapping[str, np.ndarray]
LAYOUTS = ("copy", "flat", "linear", "linear2")


class CheckpointError(ValueError):
  """A checkpoint directory that jaxpref cannot read or write (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  hf: str
  path: str
  layout: str

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"layout {self.layout!r} of {self.hf}: use one of {LAYOUTS}")


def hf_shape(layout: str, shape: Sequence[int]) -> tuple[int, ...]:
  """The Hugging Face shape of one (per-layer, per-expert) parameter of this shape."""
  if layout == "copy":
    return tuple(shape)
  if layout == "flat":
    return (math.prod(shape),)
  n_in = 1 if layout == "linear" else 2
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def from_hf(layout: str, value: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  if layout in ("copy", "flat"):
    return value.reshape(shape)
  return value.T.reshape(shape)


def to_hf(layout: str, value: np.ndarray) -> np.ndarray:
  if layout == "copy":
    return value
  if layout == "flat":
    return value.reshape(-1)
  n_in = 1 if layout == "linear" else 2
  return value.reshape(math.prod(value.shape[:n_in]), -1).T


def _flatten(tree: Any) -> dict[str, Any]:
  return {
    "/".join(str(k.key) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def _entries(table: Iterable[Tensor], shapes: dict[str, Any]) -> list[Tensor]:
  """The table entries of parameters this config has; every parameter must have one."""
  entries = [t for t in table if t.path in shapes]
  missing = sorted(set(shapes) - {t.path for t in entries})
  if missing:
    raise CheckpointError(f"no Hugging Face tensor name for parameter(s) {missing[:3]}")
  return entries


def _indices(entry: Tensor, shape: Sequence[int]) -> tuple[list[tuple[int, ...]], int]:
  """Index tuples over the stacked axes ({i}, {e}) and how many leading axes they take."""
  axes = ("{i}" in entry.hf) + ("{e}" in entry.hf)
  return list(np.ndindex(*shape[:axes])), axes


def _name(entry: Tensor, index: tuple[int, ...]) -> str:
  names = {}
  if "{i}" in entry.hf:
    names["i"] = index[0]
  if "{e}" in entry.hf:
    names["e"] = index[-1]
  return entry.hf.format(**names)


def params_from_hf(
  table: Iterable[Tensor],
  abstract_backbone: Any,
  take: Callable[[str, tuple[int, ...]], np.ndarray],
) -> dict[str, Any]:
  """Backbone params from checkpoint tensors; `take(name, hf_shape)` reads one (shape-checked).

  Stacked parameters are filled into preallocated arrays, so at most one layer's tensor is held
  twice (matters for 7B checkpoints).
  """
  shapes = _flatten(abstract_backbone)
  out = {}
  for entry in _entries(table, shapes):
    full = shapes[entry.path]
    indices, axes = _indices(entry, full.shape)
    inner = full.shape[axes:]
    stacked = np.empty(full.shape, full.dtype)
    for index in indices:
      value = take(_name(entry, index), hf_shape(entry.layout, inner))
      stacked[index] = from_hf(entry.layout, value, inner)
    out[entry.path] = stacked
  return _unflatten(out)


def params_to_hf(table: Iterable[Tensor], backbone: Any) -> dict[str, np.ndarray]:
  """Checkpoint tensors (names without the base-model prefix) of host numpy backbone params."""
  flat = _flatten(backbone)
  out = {}
  for entry in _entries(table, flat):
    value = flat[entry.path]
    indices, _ = _indices(entry, value.shape)
    for index in indices:
      out[_name(entry, index)] = np.ascontiguousarray(to_hf(entry.layout, value[index]))
  return out


@dataclasses.dataclass(frozen=True)
class Arch:
  """One architecture: its backbone, how to recognise its checkpoints and how to convert them.

  Attributes:
    name: `ModelConfig.arch`.
    backbone: `backbone(cfg, name)` -> the linen backbone Module (see `reward_model`).
    model_types: config.json `model_type` values it reads.
    classes: config.json `architectures` values it reads; the `*ForSequenceClassification` one
      is what `save_hf` writes.
    hf_prefix: the base model's prefix in `*ForSequenceClassification` tensor names.
    config_from_hf: parsed config.json -> ModelConfig fields (including "arch").
    config_to_hf: ModelConfig -> the architecture fields of config.json (model_type, sizes...).
    table: `table(cfg)` -> the `Tensor` rows of the backbone.
    decoder: causal (sequence packing and last-token pooling apply).
    head_from_hf / head_to_hf: head params <-> tensors (default: `score.weight`).
    incompatibility: why transformers would score an exported cfg differently, or None.
    check_tensors: extra checks of a checkpoint before conversion (e.g. its layer count).
    export_float32: write float32 tensors whatever the parameter dtype.
    partial_rotary: config.json can say that only part of each head is rotated
      (`model.rotary_pct` < 1); where it cannot, such a model is refused at export.
  """

  name: str
  backbone: Callable[..., Any]
  model_types: tuple[str, ...]
  classes: tuple[str, ...]
  hf_prefix: str
  config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
  config_to_hf: Callable[[ModelConfig], dict[str, Any]]
  table: Callable[[ModelConfig], Sequence[Tensor]]
  decoder: bool = True
  head_from_hf: Callable[[Tensors, ModelConfig], dict[str, Any]] | None = None
  head_to_hf: Callable[[dict[str, Any], ModelConfig], dict[str, np.ndarray]] | None = None
  incompatibility: Callable[[ModelConfig], str | None] | None = None
  check_tensors: Callable[[Tensors, ModelConfig], None] | None = None
  export_float32: bool = False
  partial_rotary: bool = False

  @property
  def export_class(self) -> str:
    return next(c for c in self.classes if c.endswith("ForSequenceClassification"))

  def params_from_hf(
    self, tensors: Tensors, cfg: ModelConfig, abstract: Any, shardings: Any = None
  ) -> dict[str, Any]:
    """Backbone and head params; `abstract` is the reward model's `abstract_params(cfg)`.

    With `shardings` (shaped like `abstract`), the backbone comes back as global jax Arrays read
    slice by slice (`tensors` must then read slices, see `safetensors_files.SafetensorsStore`);
    head params stay host arrays (they are one vector or matrix of hidden_size).
    """
    if self.check_tensors:
      self.check_tensors(tensors, cfg)
    take = Taker(tensors, self.hf_prefix, cfg)
    table = self.table(cfg)
    if shardings is None:
      backbone = params_from_hf(table, abstract["backbone"], take)
    else:
      backbone = sharded_params_from_hf(
        table, abstract["backbone"], tensors, take, shardings["backbone"]
      )
    return {"backbone": backbone} | (self.head_from_hf or score_head_from_hf)(tensors, cfg)

  def params_to_hf(self, params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    backbone = to_numpy(params["backbone"])
    if self.export_float32:
      backbone = jax.tree.map(lambda x: x.astype(np.float32), backbone)
    tensors = with_prefix(params_to_hf(self.table(cfg), backbone), self.hf_prefix)
    return tensors | (self.head_to_hf or score_head_to_hf)(params, cfg)

  def hf_config(self, cfg: ModelConfig) -> dict[str, Any]:
    """A complete `*ForSequenceClassification` config.json (num_labels=1)."""
    return seq_cls_config(cfg, self.export_class, self.config_to_hf(cfg))

  def why_incompatible(self, cfg: ModelConfig) -> str | None:
    if self.incompatibility:
      reason = self.incompatibility(cfg)
    else:
      reason = last_token_incompatibility(cfg, self.export_class)
    if reason is None and self.decoder and not self.partial_rotary and cfg.rotary_pct != 1.0:
      reason = (
        f"{self.export_class} rotates every dimension of a head, but model.rotary_pct="
        f"{cfg.rotary_pct}"
      )
    return reason


def read_region(layout: str, read, shape: Sequence[int], index: Sequence[slice]) -> np.ndarray:
  """The part `index` of one (per-layer) parameter of `shape`, read from its HF tensor.

  `read(rows, cols)` reads rows [and columns] of the HF tensor. A region whose slices are on the
  leading axis of the parameter's input and output groups (what the logical sharding rules
  produce) is read as one HF block; any other falls back to reading the whole tensor.
  """
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
  region = tuple(b - a for a, b in bounds)

  def leading_only(group: Sequence[tuple[int, int]], sizes: Sequence[int]) -> bool:
    return all(group[k] == (0, sizes[k]) for k in range(1, len(sizes)))

  def whole() -> np.ndarray:
    return from_hf(layout, read(None, None), shape)[tuple(slice(a, b) for a, b in bounds)]

  if layout == "copy":
    if len(shape) > 2:
      return whole()
    return read(slice(*bounds[0]), slice(*bounds[1]) if len(shape) == 2 else None)
  if layout == "flat":
    if not leading_only(bounds, shape):
      return whole()
    step = math.prod(shape[1:])
    return read(slice(bounds[0][0] * step, bounds[0][1] * step), None).reshape(region)
  n_in = 1 if layout == "linear" else 2
  if not (leading_only(bounds[:n_in], shape[:n_in]) and leading_only(bounds[n_in:], shape[n_in:])):
    return whole()
  step_in, step_out = math.prod(shape[1:n_in]), math.prod(shape[n_in + 1 :])
  rows = slice(bounds[n_in][0] * step_out, bounds[n_in][1] * step_out)
  cols = slice(bounds[0][0] * step_in, bounds[0][1] * step_in)
  return read(rows, cols).T.reshape(region)


def sharded_params_from_hf(
  table: Iterable[Tensor], abstract_backbone: Any, store: Any, take: Taker, shardings: Any
) -> dict[str, Any]:
  """Backbone params as global `jax.Array`s; each process reads only its own devices' slices.

  `store` reads slices (`shape(key)`, `read_slice(key, rows, cols)`, see `safetensors_files`);
  `shardings` is a pytree of shardings shaped like the backbone params.
  """
  shapes, placements = _flatten(abstract_backbone), _flatten(shardings)
  dtype = take.cfg.jnp_param_dtype
  out = {}
  for entry in _entries(table, shapes):
    full = shapes[entry.path]
    axes = ("{i}" in entry.hf) + ("{e}" in entry.hf)
    inner = full.shape[axes:]
    keys = {}
    for index in np.ndindex(*full.shape[:axes]):
      key = take.key(_name(entry, index))
      want = hf_shape(entry.layout, inner)
      if tuple(store.shape(key)) != want:
        raise CheckpointError(
          f"tensor {key} has shape {tuple(store.shape(key))}, expected {want} from config.json"
        )
      keys[index] = key

    def callback(index, entry=entry, full=full, axes=axes, inner=inner, keys=keys):
      stacked = [range(*s.indices(n)) for s, n in zip(index[:axes], full.shape[:axes])]
      pieces = [
        read_region(
          entry.layout,
          functools.partial(store.read_slice, keys[combo]),
          inner,
          index[axes:],
        ).astype(dtype)
        for combo in itertools.product(*stacked)
      ]
      return np.stack(pieces).reshape(*(len(r) for r in stacked), *pieces[0].shape)

    out[entry.path] = jax.make_array_from_callback(full.shape, placements[entry.path], callback)
  return _unflatten(out)


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same on every process) as global arrays with these shardings."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x[index])),
    tree,
    shardings,
  )


# ---------------------------------------------------------------------------------------------
# Helpers shared by the architectures' converters.
# ---------------------------------------------------------------------------------------------


class Taker:
  """`take(name, shape)`: a checkpoint tensor (with or without `prefix.`), shape-checked and cast
  to the parameter dtype."""

  def __init__(self, tensors: Tensors, prefix: str, cfg: ModelConfig):
    self.tensors, self.prefix, self.cfg = tensors, prefix, cfg

  def key(self, name: str) -> str:
    key = f"{self.prefix}.{name}"
    if key not in self.tensors:
      key = name
    if key not in self.tensors:
      raise CheckpointError(
        f"tensor {self.prefix}.{name} not found (does config.json match the weights?)"
      )
    return key

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = self.key(name)
    value = self.tensors[key]
    if tuple(value.shape) != tuple(shape):
      file_of = getattr(self.tensors, "file_of", None)
      where = f" in {file_of(key).name}" if file_of else ""
      raise CheckpointError(
        f"tensor {key}{where} has shape {tuple(value.shape)}, expected "
        f"{tuple(shape)} from config.json"
      )
    return np.asarray(value).astype(self.cfg.jnp_param_dtype)


def to_numpy(tree: Any) -> Any:
  """Host numpy copies of (possibly sharded, multi-process) arrays."""

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(fetch, tree)


def with_prefix(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {f"{prefix}.{k}": np.ascontiguousarray(v) for k, v in tensors.items()}


def special_tokens_from_hf(
  hf_cfg: dict[str, Any], *, bos: int | None, eos: int | None
) -> dict[str, int | None]:
  """pad/bos/eos ids (the first one where config.json lists several eos ids)."""

  def first(value):
    return value[0] if isinstance(value, list) and value else (value if value != [] else None)

  return {
    "pad_token_id": first(hf_cfg.get("pad_token_id")),
    "bos_token_id": first(hf_cfg.get("bos_token_id", bos)),
    "eos_token_id": first(hf_cfg.get("eos_token_id", eos)),
  }


def seq_cls_config(cfg: ModelConfig, class_name: str, fields: dict[str, Any]) -> dict[str, Any]:
  """A `*ForSequenceClassification` config.json with one label and jaxpref's head settings."""
  return {
    "architectures": [class_name],
    **fields,
    "id2label": {"0": "LABEL_0"},
    "label2id": {"LABEL_0": 0},
    "pad_token_id": cfg.pad_token_id,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": cfg.eos_token_id,
    "dtype": cfg.param_dtype,
    "torch_dtype": cfg.param_dtype,
    "jaxpref_pooling": cfg.pooling,
    "jaxpref_head_bias": cfg.head_bias,
  }


def score_head_from_hf(tensors: Tensors, cfg: ModelConfig) -> dict[str, Any]:
  """`score.weight` [1, D] (and `score.bias` if cfg.head_bias) of a *ForSequenceClassification."""
  take = Taker(tensors, "score", cfg)
  if "score.weight" not in tensors:
    return {}
  score = {"kernel": take("weight", (1, cfg.hidden_size)).T}
  if cfg.head_bias and "score.bias" in tensors:
    score["bias"] = take("bias", (1,))
  return {"score": score}


def score_head_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  score = to_numpy(params["score"])
  out = {"score.weight": np.ascontiguousarray(score["kernel"].T)}
  if "bias" in score:  # transformers ignores it (its score layer has no bias); jaxpref reads it.
    out["score.bias"] = score["bias"]
  return out


def last_token_incompatibility(cfg: ModelConfig, class_name: str) -> str | None:
  if cfg.pooling != "last":
    return f"{class_name} scores the last non-padding token, but model.pooling={cfg.pooling!r}"
  if cfg.head_bias:
    return f"{class_name}'s score layer has no bias, but model.head_bias=True"
  return None
