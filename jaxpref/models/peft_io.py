"""PEFT adapter directories: `save_adapter` writes a LoRA run as one, `load_adapter` reads it back.

The directory holds `adapter_config.json` (PEFT's `LoraConfig`, task SEQ_CLS, the reward head in
`modules_to_save`) and `adapter_model.safetensors` with PEFT's tensor names, so that

    base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)
    model = peft.PeftModel.from_pretrained(base, ADAPTER_DIR)

gives jaxpref's rewards. The freshly trained head travels with the adapters (the bug of LoRA
exports that drop it, OpenRLHF #872, cannot happen here).

Layout: a jaxpref kernel [in..., out...] is Hugging Face's `weight` [out, in] after flattening
(`W = K.reshape(in, out).T`), so `lora_a` [in..., r] is PEFT's `lora_A.weight` [r, in]
transposed and `lora_b` [r, out...] is `lora_B.weight` [out, r] transposed. `save_adapter`
checks that layout against the architecture's own converter before writing, so an architecture
whose converter permutes a kernel differently fails with a clear message instead of writing a
wrong adapter (export merged weights then).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxpref.models import convert, hf_io, lora, registry
from jaxpref.models.config import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path) -> bool:
  return (Path(path) / ADAPTER_CONFIG).is_file()


def _hf_module(hf_names: set[str], path: tuple[str, ...], layer: int | None) -> str | None:
  """The HF module name (no `.weight`) of the jaxpref dense layer `path` (below backbone)."""
  if layer is None:
    tail = ".".join(path)
  else:
    tail = ".".join(("layers", str(layer)) + path[path.index("layers") + 1 :])
  found = [n for n in hf_names if n == f"{tail}.weight" or n.endswith(f".{tail}.weight")]
  return found[0].removesuffix(".weight") if len(found) == 1 else None


def _layers_of(node: dict, kernel_ndim: int) -> int | None:
  lead = node["lora_a"].ndim + node["lora_b"].ndim - 2 - kernel_ndim
  if lead not in (0, 1):
    raise hf_io.CheckpointError(f"adapters with {lead} stacked axes are not supported")
  return node["lora_a"].shape[0] if lead else None


def adapter_tensors(cfg: ModelConfig, params: dict) -> tuple[dict[str, np.ndarray], list[str]]:
  """PEFT's adapter tensors (without the head) and the HF module names they adapt."""
  params = convert.to_numpy(params)
  base_hf = registry.get(cfg.arch).params_to_hf(lora.without_adapters(params), cfg)
  tensors, modules = {}, []
  for path, node in lora.adapter_modules(params["backbone"]):
    kernel = node["kernel"]
    num_layers = _layers_of(node, kernel.ndim)
    for layer in [None] if num_layers is None else range(num_layers):
      pick = (lambda x: x) if layer is None else (lambda x, i=layer: x[i])
      k, a, b = pick(kernel), pick(node["lora_a"]), pick(node["lora_b"])
      rank = a.shape[-1]
      a2, b2 = a.reshape(-1, rank), b.reshape(rank, -1)
      name = _hf_module(set(base_hf), path, layer)
      expected = k.reshape(a2.shape[0], b2.shape[1]).T
      if name is None or not np.array_equal(np.asarray(base_hf[f"{name}.weight"]), expected):
        raise hf_io.CheckpointError(
          f"model.arch={cfg.arch!r}: the adapters of backbone/{'/'.join(path)} have no PEFT "
          "equivalent (the Hugging Face weight is not this kernel transposed); export merged "
          "weights instead (without --adapter)"
        )
      tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a2.T, np.float32)
      tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b2.T, np.float32)
      modules.append(name)
  return tensors, sorted(modules)


def save_adapter(
  path: str | Path,
  cfg: ModelConfig,
  params: dict,
  *,
  base_model: str,
  tokenizer: Any = None,
) -> Path:
  """Writes a LoRA reward model as a PEFT adapter directory (see the module docstring).

  Args:
    path: output directory.
    cfg: the model config, with `cfg.lora` set.
    params: the reward-model params, adapters included.
    base_model: the base checkpoint's directory (PEFT's `base_model_name_or_path`).
    tokenizer: saved alongside, as `hf_io.save_hf` does.
  """
  from safetensors.numpy import save_file

  if cfg.lora is None:
    raise hf_io.CheckpointError("--adapter needs a LoRA run (lora.rank > 0); this run has none")
  arch = registry.get(cfg.arch)
  reason = arch.why_incompatible(cfg)
  if reason:
    raise hf_io.CheckpointError(f"--adapter: {reason}; transformers would give different rewards")
  tensors, modules = adapter_tensors(cfg, params)
  head = (arch.head_to_hf or convert.score_head_to_hf)(convert.to_numpy(params), cfg)
  tensors |= {f"{PEFT_PREFIX}{k}": np.ascontiguousarray(v) for k, v in head.items()}
  config = {
    "peft_type": "LORA",
    "task_type": "SEQ_CLS",
    "base_model_name_or_path": str(base_model),
    "r": cfg.lora.rank,
    "lora_alpha": cfg.lora.alpha,
    "lora_dropout": cfg.lora.dropout,
    "target_modules": modules,
    "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in head}),
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
  }
  directory = Path(path)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
      hf_io._save_tokenizer(directory, tokenizer)
  return directory


def read_adapter_config(path: str | Path) -> dict[str, Any]:
  where = Path(path) / ADAPTER_CONFIG
  try:
    config = json.loads(where.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise hf_io.CheckpointError(f"{where}: cannot read ({e})") from e
  if config.get("peft_type") != "LORA":
    raise hf_io.CheckpointError(f"{where}: peft_type={config.get('peft_type')!r}; need LORA")
  for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
    if config.get(key):
      raise hf_io.CheckpointError(f"{where}: {key}=true is not supported")
  for key in ("rank_pattern", "alpha_pattern"):
    if config.get(key):
      raise hf_io.CheckpointError(f"{where}: a per-module {key} is not supported")
  return config


def base_model_of(path: str | Path) -> str:
  return str(read_adapter_config(path).get("base_model_name_or_path") or "")


def load_adapter(path: str | Path, *, base_model: str | None = None) -> tuple[ModelConfig, dict]:
  """A PEFT LoRA adapter on its base as a plain jaxpref reward model (adapters merged).

  Args:
    path: the adapter directory.
    base_model: the base checkpoint directory (default: the adapter's `base_model_name_or_path`).

  Returns:
    (cfg, params) as `hf_io.load_hf` returns them.
  """
  from safetensors.numpy import load_file

  directory = Path(path)
  config = read_adapter_config(directory)
  base = base_model or config.get("base_model_name_or_path")
  if not base or not Path(base).expanduser().is_dir():
    raise hf_io.CheckpointError(
      f"{directory / ADAPTER_CONFIG}: base_model_name_or_path={base!r} is not a local directory"
    )
  cfg, params = hf_io.load_hf(base)
  tensors = {
    k.removeprefix(PEFT_PREFIX): v for k, v in load_file(directory / ADAPTER_WEIGHTS).items()
  }
  scale = float(config["lora_alpha"]) / float(config["r"])
  params = _add_deltas(cfg, params, tensors, scale, where=str(directory))
  head_from_hf = registry.get(cfg.arch).head_from_hf or convert.score_head_from_hf
  head = head_from_hf(
    {k.replace(".modules_to_save.default", ""): v for k, v in tensors.items()}, cfg
  )
  if "score" not in head:
    raise hf_io.CheckpointError(f"{directory}: the adapter has no reward head (score.weight)")
  return cfg, params | head


def _add_deltas(
  cfg: ModelConfig, params: dict, tensors: Mapping[str, np.ndarray], scale: float, where: str
) -> dict:
  """Adds `scale * B A` of every adapted module to the matching jaxpref kernel (host arrays)."""
  modules = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
  used: set[str] = set()

  def fold(path: tuple[str, ...], node):
    if not isinstance(node, dict):
      return node
    if "kernel" not in node or path[:1] != ("backbone",):
      return {k: fold(path + (k,), v) for k, v in node.items()}
    kernel = np.array(node["kernel"], np.float32)
    layers = [None] if "layers" not in path else range(kernel.shape[0])
    for layer in layers:
      name = _hf_module({f"{m}.weight" for m in modules}, path[1:], layer)
      if name is None:
        continue
      used.add(name)
      a_t, b_t = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
      target = kernel if layer is None else kernel[layer]
      target += scale * (b_t.astype(np.float32) @ a_t.astype(np.float32)).T.reshape(target.shape)
    return node | {"kernel": kernel.astype(node["kernel"].dtype)}

  params = fold((), params)
  unused = sorted(modules - used)
  if unused:
    raise hf_io.CheckpointError(
      f"{where}: adapters for {unused[:3]} match no dense layer of model.arch={cfg.arch!r}"
    )
  return params
