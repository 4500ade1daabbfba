"""Hugging Face checkpoint interop: `load_hf` reads a local transformers directory, `save_hf` writes
a `*ForSequenceClassification` directory that transformers loads and that gives the same rewards.

Nothing here touches the network: a hub id must be downloaded first
(`hf download ORG/NAME --local-dir DIR`, then pass DIR).

Architectures come from `jaxpref.models.registry` (one `convert.Arch` each: a converter table
used in both directions, config.json reader and writer). Converters raise `KeyError` /
`ValueError` (or `CheckpointError`) for bad input; `load_hf` turns them into a one-line
`CheckpointError` naming the checkpoint. Head params the checkpoint lacks are initialised as
transformers would (normal(0, initializer_range) kernels, zero biases).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref import sharding
from jaxpref.models import convert, registry
from jaxpref.models.config import ModelConfig
from jaxpref.models.convert import CheckpointError, to_numpy
from jaxpref.models.reward_model import abstract_params, logical_axes
from jaxpref.models.safetensors_files import open_weights

__all__ = ["CheckpointError", "from_hf", "load_hf", "read_config", "save_hf", "to_numpy"]

log = logging.getLogger(__name__)

Tensors = Mapping[str, np.ndarray]


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


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint directory.
# ---------------------------------------------------------------------------------------------


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
  arch, _ = registry.resolve(hf_cfg, where)
  try:
    fields = arch.config_from_hf(hf_cfg)
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


def _check_tree(params: dict, cfg: ModelConfig, expected: dict, where: str) -> dict:
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
  mesh: jax.sharding.Mesh | None = None,
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
    mesh: place the params on this mesh by the logical sharding rules
      (`jaxpref.sharding.LOGICAL_RULES`). Each process then reads from the files only the slices
      its own devices hold, never the whole model (what a checkpoint larger than one host's
      memory needs).
    **overrides: other ModelConfig fields (e.g. remat=True).

  Returns:
    (cfg, params) with params in the layout of `reward_model.init_params`: host numpy arrays, or
    global jax Arrays sharded over `mesh`.

  Raises:
    CheckpointError: missing or unreadable files, unsupported architecture, num_labels != 1,
      tensor shapes that do not match config.json.
  """
  directory = _checkpoint_dir(path)
  hf_cfg = read_config(directory)
  where = str(directory)
  arch, class_name = registry.resolve(hf_cfg, f"{directory}/config.json")
  if class_name and class_name.endswith("ForSequenceClassification"):
    num_labels = _num_labels(hf_cfg)
    if num_labels != 1:
      raise CheckpointError(
        f"{directory}/config.json: {class_name} has num_labels={num_labels}; "
        "a reward model needs num_labels=1 (load the base model instead)"
      )
  cfg = from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype, pooling=pooling, **overrides)
  tensors = open_weights(directory)
  expected = abstract_params(cfg)
  shardings = None
  if mesh is not None:
    shardings = sharding.tree_shardings(expected, logical_axes(cfg), mesh)
  try:
    params: dict[str, Any] = arch.params_from_hf(tensors, cfg, expected, shardings)
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
  _check_tree(params, cfg, expected, where)
  if shardings is not None:
    heads = {k: v for k, v in params.items() if k != "backbone"}
    params |= convert.place(heads, {k: shardings[k] for k in heads})
    log.info("%s: read %d bytes of tensor data in this process", where, tensors.bytes_read)
  return cfg, params


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
  arch = registry.get(cfg.arch)
  reason = arch.why_incompatible(cfg)
  if strict and reason:
    raise CheckpointError(
      f"save_hf: {reason}; transformers would give different rewards "
      "(pass strict=False to write it anyway)"
    )
  config = arch.hf_config(cfg)
  config["pad_token_id"] = _resolve_pad_id(cfg, tokenizer, pad_token_id)
  tensors = arch.params_to_hf(params, cfg)
  directory = Path(path)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_safetensors(directory, tensors, max_shard_bytes)
    if tokenizer is not None:
      _save_tokenizer(directory, tokenizer)
  return directory
