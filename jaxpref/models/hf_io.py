"""Hugging Face checkpoint interop: `load_hf` reads a local transformers directory, `save_hf` writes
a `*ForSequenceClassification` directory that transformers loads and that gives the same rewards.

Nothing here touches the network: a hub id must be downloaded first
(`hf download ORG/NAME --local-dir DIR`, then pass DIR).

Per-architecture converters
---------------------------
Each architecture is a module registered in `HF_ARCHS` (`register_arch` adds one) that exposes:

  config_from_hf(hf_cfg: dict) -> dict
      ModelConfig fields (including "arch") of a parsed `config.json`.
  params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict
      The backbone params (`params["backbone"]`) from the checkpoint tensors, keyed by their
      Hugging Face names (with or without the base-model prefix such as `model.`); arrays are
      read lazily, so a converter only loads what it asks for.
  params_to_hf(backbone_params, cfg) -> dict[str, np.ndarray]
      The backbone tensors under their `*ForSequenceClassification` names (prefixed).
  hf_config_dict(cfg) -> dict
      A complete `*ForSequenceClassification` config.json (architectures, num_labels=1, ...).
and optionally
  head_params_from_hf(tensors, cfg) -> dict   head params found in the checkpoint ({"score": ...},
                                              maybe {"pooler": ...}); default: `score.weight`.
  head_params_to_hf(params, cfg) -> dict      their tensors; default: `score.weight`.
  hf_incompatibility(cfg) -> str | None       why transformers would not reproduce the rewards.

Converters raise `KeyError` / `ValueError` (or `CheckpointError`) for bad input; `load_hf` turns
them into a one-line `CheckpointError` naming the checkpoint. Head params the checkpoint lacks
are initialised as transformers would (normal(0, initializer_range) kernels, zero biases).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models.config import ModelConfig

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]


class CheckpointError(ValueError):
  """A checkpoint directory that jaxpref cannot read or write (one-line message)."""


@dataclasses.dataclass(frozen=True)
class HFArch:
  """How to recognise and convert one architecture's checkpoints."""

  arch: str  # ModelConfig.arch
  module: str  # importable module implementing the converter interface
  model_types: tuple[str, ...]  # config.json `model_type` values
  classes: tuple[str, ...]  # supported config.json `architectures` values


HF_ARCHS: dict[str, HFArch] = {}


def register_arch(spec: HFArch) -> None:
  HF_ARCHS[spec.arch] = spec


register_arch(
  HFArch(
    "gpt_neox",
    "jaxpref.models.gpt_neox",
    ("gpt_neox",),
    ("GPTNeoXForCausalLM", "GPTNeoXModel", "GPTNeoXForSequenceClassification"),
  )
)
register_arch(
  HFArch(
    "llama",
    "jaxpref.models.llama",
    ("llama",),
    ("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification"),
  )
)
register_arch(
  HFArch("bert", "jaxpref.models.bert", ("bert",), ("BertModel", "BertForSequenceClassification"))
)

# Tensors that checkpoints carry but a reward model does not use (LM heads, cached buffers).
_UNUSED = re.compile(
  r"(^|\.)(lm_head|embed_out)\.|rotary_emb\.inv_freq$|"
  r"\.attention\.(masked_)?bias$|position_ids$"
)
_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "vocab.txt",
  "added_tokens.json",
  "chat_template.jinja",
)


def _supported_classes() -> list[str]:
  return [c for spec in HF_ARCHS.values() for c in spec.classes]


def _module(arch: str):
  if arch not in HF_ARCHS:
    raise CheckpointError(
      f"model.arch={arch!r} has no Hugging Face converter; supported: {sorted(HF_ARCHS)}"
    )
  return importlib.import_module(HF_ARCHS[arch].module)


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint directory.
# ---------------------------------------------------------------------------------------------


class SafetensorsStore(Mapping):
  """Lazily read tensors of one or several safetensors files; remembers which were read."""

  def __init__(self, files_by_key: dict[str, Path]):
    self._files_by_key = files_by_key
    self._handles: dict[Path, Any] = {}
    self.read: set[str] = set()

  def file_of(self, key: str) -> Path:
    return self._files_by_key[key]

  def __getitem__(self, key: str) -> np.ndarray:
    from safetensors import safe_open

    path = self._files_by_key[key]
    if path not in self._handles:
      self._handles[path] = safe_open(str(path), framework="np")
    self.read.add(key)
    return self._handles[path].get_tensor(key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._files_by_key)

  def __len__(self) -> int:
    return len(self._files_by_key)


def _open_weights(directory: Path) -> SafetensorsStore:
  from safetensors import safe_open

  index = directory / "model.safetensors.index.json"
  single = directory / "model.safetensors"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
    for shard in sorted(set(weight_map.values())):
      if not (directory / shard).is_file():
        raise CheckpointError(f"{index} lists shard {shard}, which is missing from {directory}")
    return SafetensorsStore({k: directory / v for k, v in weight_map.items()})
  files = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
  if not files:
    others = [p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".h5")]
    hint = (
      (
        f"; found {others[0]}: jaxpref reads only safetensors (re-save it with transformers' "
        "save_pretrained, which writes safetensors)"
      )
      if others
      else ""
    )
    raise CheckpointError(
      f"no model.safetensors or model.safetensors.index.json in {directory}{hint}"
    )
  files_by_key = {}
  for path in files:
    try:
      with safe_open(str(path), framework="np") as f:
        files_by_key |= dict.fromkeys(f.keys(), path)
    except Exception as e:  # safetensors raises its own error types for corrupt files.
      raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
  return SafetensorsStore(files_by_key)


def _checkpoint_dir(path: str | Path) -> Path:
  directory = Path(path).expanduser()
  if directory.is_file() and (
    directory.name == "config.json" or directory.suffix in (".safetensors", ".json")
  ):
    directory = directory.parent
  if not directory.exists():
    text = str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
      raise CheckpointError(
        f"{text!r} is not a local directory and looks like a Hugging Face Hub id; jaxpref never "
        f"downloads: run `hf download {text} --local-dir DIR` (huggingface-hub's CLI) and pass DIR"
      )
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  if not directory.is_dir():
    raise CheckpointError(f"{directory} is not a directory (expected a Hugging Face model dir)")
  return directory


def read_config(path: str | Path) -> dict[str, Any]:
  """The parsed config.json of a local Hugging Face model directory."""
  directory = _checkpoint_dir(path)
  config_path = directory / "config.json"
  if (directory / "model_config.json").is_file():
    raise CheckpointError(
      f"{directory} is a jaxpref training workdir, not a Hugging Face model dir: pass it as "
      f"--workdir={directory}, or export it first (python -m jaxpref.export --workdir={directory} "
      "--output=DIR)"
    )
  if not config_path.is_file():
    raise CheckpointError(
      f"no config.json in {directory}: expected a Hugging Face model "
      "directory (config.json + model.safetensors)"
    )
  try:
    hf_cfg = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}:{e.lineno}: invalid JSON ({e.msg})") from e
  if not isinstance(hf_cfg, dict):
    raise CheckpointError(f"{config_path}: expected a JSON object")
  return hf_cfg


def _resolve_arch(hf_cfg: dict[str, Any], where: str) -> tuple[HFArch, str | None]:
  model_type = hf_cfg.get("model_type")
  class_name = (hf_cfg.get("architectures") or [None])[0]
  for spec in HF_ARCHS.values():
    if model_type in spec.model_types:
      if class_name is not None and class_name not in spec.classes:
        break
      return spec, class_name
  raise CheckpointError(
    f"{where}: unsupported architecture {class_name or model_type!r} "
    f"(model_type={model_type!r}); supported: {_supported_classes()}"
  )


def _num_labels(hf_cfg: dict[str, Any]) -> int:
  if isinstance(hf_cfg.get("id2label"), dict):
    return len(hf_cfg["id2label"])
  return int(hf_cfg.get("num_labels") or 2)  # transformers' default


def from_hf(hf_cfg: dict[str, Any] | str | Path, **overrides) -> ModelConfig:
  """A ModelConfig from a Hugging Face config dict or model directory, with field overrides."""
  where = "config"
  if not isinstance(hf_cfg, dict):
    where = str(Path(hf_cfg) / "config.json")
    hf_cfg = read_config(hf_cfg)
  spec, _ = _resolve_arch(hf_cfg, where)
  try:
    fields = _module(spec.arch).config_from_hf(hf_cfg)
    for key, field in (("jaxpref_pooling", "pooling"), ("jaxpref_head_bias", "head_bias")):
      if key in hf_cfg:
        fields[field] = hf_cfg[key]
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
      raise ValueError(f"unknown model config field(s) {unknown}")
    fields |= {k: v for k, v in overrides.items() if v is not None}
    return ModelConfig(**fields)
  except (KeyError, ValueError, TypeError) as e:
    raise CheckpointError(f"{where}: {_message(e)}") from e


def _message(e: Exception) -> str:
  return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# ---------------------------------------------------------------------------------------------
# Helpers for converters.
# ---------------------------------------------------------------------------------------------


class Taker:
  """`take(name, shape)`: a checkpoint tensor (with or without `prefix.`), shape-checked and cast
  to the parameter dtype."""

  def __init__(self, tensors: Tensors, prefix: str, cfg: ModelConfig):
    self.tensors, self.prefix, self.cfg = tensors, prefix, cfg

  def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = f"{self.prefix}.{name}"
    if key not in self.tensors:
      key = name
    if key not in self.tensors:
      raise CheckpointError(
        f"tensor {self.prefix}.{name} not found (does config.json match the weights?)"
      )
    value = self.tensors[key]
    if tuple(value.shape) != tuple(shape):
      where = ""
      if isinstance(self.tensors, SafetensorsStore):
        where = f" in {self.tensors.file_of(key).name}"
      raise CheckpointError(
        f"tensor {key}{where} has shape {tuple(value.shape)}, expected "
        f"{tuple(shape)} from config.json"
      )
    return np.asarray(value).astype(self.cfg.jnp_param_dtype)


def stack_layers(layer_trees: Iterable[Any], num_layers: int) -> Any:
  """Stacks per-layer param trees on a new leading axis, filling preallocated arrays so that at
  most one layer is held twice (matters for 7B checkpoints)."""
  stacked = None
  for i, tree in enumerate(layer_trees):
    if stacked is None:
      stacked = jax.tree.map(lambda x: np.empty((num_layers, *x.shape), x.dtype), tree)
    jax.tree.map(lambda out, x, i=i: out.__setitem__(i, x), stacked, tree)
  return stacked


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


# ---------------------------------------------------------------------------------------------
# load_hf / save_hf.
# ---------------------------------------------------------------------------------------------


def _fresh_head(name: str, cfg: ModelConfig, rng: jax.Array) -> dict[str, np.ndarray]:
  d = cfg.hidden_size
  out_features = 1 if name == "score" else d
  kernel = jax.random.normal(rng, (d, out_features), jnp.float32) * cfg.initializer_range
  head = {"kernel": np.asarray(kernel).astype(cfg.jnp_param_dtype)}
  if name == "pooler" or cfg.head_bias:
    head["bias"] = np.zeros((out_features,), cfg.jnp_param_dtype)
  return head


def _check_tree(params: dict, cfg: ModelConfig, where: str) -> dict:
  from jaxpref.models.reward_model import abstract_params

  expected = abstract_params(cfg)
  got_paths = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want_paths = {
    jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(expected)
  }
  missing = sorted(set(want_paths) - set(got_paths))
  extra = sorted(set(got_paths) - set(want_paths))
  if missing or extra:
    raise CheckpointError(
      f"{where}: converted params do not match model.arch={cfg.arch!r}: "
      f"missing {missing[:3]}, unexpected {extra[:3]}"
    )
  for name, want in want_paths.items():
    if tuple(got_paths[name].shape) != tuple(want.shape):
      raise CheckpointError(
        f"{where}: param {name} has shape {got_paths[name].shape}, expected {want.shape}"
      )
  return params


def load_hf(
  path: str | Path,
  *,
  dtype: str | None = None,
  param_dtype: str | None = None,
  pooling: str | None = None,
  head_seed: int = 0,
  **overrides,
) -> tuple[ModelConfig, dict]:
  """Loads a local Hugging Face checkpoint as a jaxpref reward model.

  Args:
    path: a directory with config.json and model.safetensors (or a sharded
      model.safetensors.index.json). Never a hub id: download it first.
    dtype: compute dtype (default float32).
    param_dtype: parameter dtype (default float32, whatever the checkpoint stores).
    pooling: overrides the pooling (default: `last` for decoders, what HF's
      *ForSequenceClassification uses).
    head_seed: seed of the reward head when the checkpoint has none (not a
      *ForSequenceClassification): normal(0, initializer_range), as transformers initialises it.
    **overrides: other ModelConfig fields (e.g. remat=True).

  Returns:
    (cfg, params) with params as host numpy arrays in the layout of `reward_model.init_params`.

  Raises:
    CheckpointError: missing or unreadable files, unsupported architecture, num_labels != 1,
      tensor shapes that do not match config.json.
  """
  directory = _checkpoint_dir(path)
  hf_cfg = read_config(directory)
  where = str(directory)
  spec, class_name = _resolve_arch(hf_cfg, f"{directory}/config.json")
  if class_name and class_name.endswith("ForSequenceClassification"):
    num_labels = _num_labels(hf_cfg)
    if num_labels != 1:
      raise CheckpointError(
        f"{directory}/config.json: {class_name} has num_labels={num_labels}; "
        "a reward model needs num_labels=1 (load the base model instead)"
      )
  cfg = from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype, pooling=pooling, **overrides)
  module = _module(spec.arch)
  tensors = _open_weights(directory)
  try:
    params: dict[str, Any] = {"backbone": module.params_from_hf(tensors, cfg)}
    head_from_hf = getattr(module, "head_params_from_hf", score_head_from_hf)
    params |= head_from_hf(tensors, cfg)
  except CheckpointError as e:
    raise CheckpointError(f"{where}: {e}") from e
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{where}: {_message(e)}") from e
  rng = jax.random.key(head_seed)
  for name in ("score", "pooler"):
    if name not in params and (name == "score" or cfg.pooling == "pooler"):
      log.info("%s has no %s head: initialising it from seed %d", where, name, head_seed)
      params[name] = _fresh_head(name, cfg, jax.random.fold_in(rng, name == "pooler"))
  unused = [k for k in tensors if k not in tensors.read and not _UNUSED.search(k)]
  if unused:
    log.warning("%s: %d checkpoint tensors were not used, e.g. %s", where, len(unused), unused[:3])
  return cfg, _check_tree(params, cfg, where)


def _resolve_pad_id(cfg: ModelConfig, tokenizer: Any, pad_token_id: int | None) -> int | None:
  if pad_token_id is not None:
    return pad_token_id
  if cfg.pad_token_id is not None:
    return cfg.pad_token_id
  tok_pad = getattr(tokenizer, "pad_token_id", None)
  if tok_pad is None and getattr(tokenizer, "padding", None):
    tok_pad = tokenizer.padding.get("pad_id")
  if tok_pad is not None:
    return tok_pad
  if cfg.eos_token_id is not None:
    log.warning(
      "save_hf: no pad token id; using eos_token_id=%d. transformers then scores the "
      "last token that is not EOS, so sequences ending in EOS score differently there",
      cfg.eos_token_id,
    )
  return cfg.eos_token_id


def _write_safetensors(
  directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int
) -> None:
  from safetensors.numpy import save_file

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = value
    size += value.nbytes
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(directory / filename), metadata=metadata)
    weight_map |= dict.fromkeys(shard, filename)
  index = {
    "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
    "weight_map": weight_map,
  }
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _save_tokenizer(directory: Path, tokenizer: Any) -> None:
  if isinstance(tokenizer, (str, Path)):
    source = Path(tokenizer)
    if source.is_file():
      source = source.parent
    found = [source / f for f in _TOKENIZER_FILES if (source / f).is_file()]
    if not found:
      raise CheckpointError(
        f"no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...) in {source}"
      )
    for f in found:
      shutil.copy2(f, directory / f.name)
  elif hasattr(tokenizer, "save_pretrained"):
    tokenizer.save_pretrained(str(directory))
  elif hasattr(tokenizer, "to_str"):  # a `tokenizers.Tokenizer`
    (directory / "tokenizer.json").write_text(tokenizer.to_str())
  else:
    raise CheckpointError(
      f"save_hf: cannot save a tokenizer of type {type(tokenizer).__name__}; "
      "pass a directory, a transformers tokenizer or a tokenizers.Tokenizer"
    )


def save_hf(
  path: str | Path,
  cfg: ModelConfig,
  params: dict,
  tokenizer: Any = None,
  *,
  pad_token_id: int | None = None,
  strict: bool = True,
  max_shard_bytes: int = 5 * 2**30,
) -> Path:
  """Writes a reward model as a transformers `*ForSequenceClassification` directory.

  `transformers.AutoModelForSequenceClassification.from_pretrained(path)` loads it and gives the
  same rewards (up to float error); `load_hf(path)` reads it back.

  Args:
    path: output directory (created; existing files are overwritten).
    cfg: the model config.
    params: the reward model params (numpy or jax arrays, possibly sharded).
    tokenizer: a tokenizer directory, a transformers tokenizer or a `tokenizers.Tokenizer`,
      saved alongside the weights.
    pad_token_id: written to config.json (default: cfg's, the tokenizer's, else the eos id).
      transformers scores the last token that differs from it.
    strict: refuse configs transformers would score differently (e.g. pooling != "last" for
      decoders); with strict=False they are written and jaxpref reads them back faithfully.
    max_shard_bytes: weights larger than this are split into shards with an index.

  Returns:
    The output directory.
  """
  module = _module(cfg.arch)
  reason = getattr(module, "hf_incompatibility", lambda _: None)(cfg)
  if strict and reason:
    raise CheckpointError(
      f"save_hf: {reason}; transformers would give different rewards "
      "(pass strict=False to write it anyway)"
    )
  config = module.hf_config_dict(cfg)
  config["pad_token_id"] = _resolve_pad_id(cfg, tokenizer, pad_token_id)
  head_to_hf = getattr(module, "head_params_to_hf", score_head_to_hf)
  tensors = module.params_to_hf(params["backbone"], cfg) | head_to_hf(params, cfg)
  directory = Path(path)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_safetensors(directory, tensors, max_shard_bytes)
    if tokenizer is not None:
      _save_tokenizer(directory, tokenizer)
  return directory
