"""LoRA: low-rank adapters on the backbone's dense kernels, chosen by name, for any architecture.

A targeted dense layer `y = x W (+ b)` becomes `y = x W (+ b) + (alpha / rank) * dropout(x) A B`,
with `A` [in..., rank] drawn as PEFT draws `lora_A` (kaiming-uniform, bound 1/sqrt(fan_in)) and
`B` [rank, out...] zero, so training starts from the base model exactly. The adapters are two
more parameters, `lora_a` and `lora_b`, stored next to the layer's `kernel` (a scanned layer
stack gives them the leading "layers" axis like every other layer parameter), so checkpoints,
sharding by logical axis names, remat and packing need nothing new.

No architecture code changes: `RewardModel` runs its backbone under `adapters(cfg)`, a flax
method interceptor that adds the low-rank path to every `nn.DenseGeneral` call whose module path
matches `LoraConfig.targets`. Targets are matched by name, so a new decoder family is covered as
soon as its dense layers are `DenseGeneral`s:

  "attention"  every dense layer under a module whose name contains "attn" or "attention"
  "mlp"        every dense layer under a module whose name contains "mlp", "ffn", "feed_forward"
               or "moe"
  "all"        every dense layer of the backbone
  a name       a dense layer's own name ("q_proj") or a dotted tail of its path
               ("attention.dense"), as PEFT's `target_modules` match

The reward head (and BERT's pooler) lies outside the backbone and trains fully; which parameters
train is `is_trainable(path)`. `merge(cfg, params)` folds the adapters into the kernels (a plain
model again), and `peft_tensors` / `from_peft_tensors` map the adapters to and from PEFT's
`lora_A` / `lora_B` tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

if TYPE_CHECKING:
  from jaxpref.models.config import ModelConfig

ADAPTER_NAMES = ("lora_a", "lora_b")
GROUPS = {
  "attention": ("attn", "attention"),
  "mlp": ("mlp", "ffn", "feed_forward", "moe"),
}
DEFAULT_TARGETS = ("attention", "mlp")
# Mixture-of-experts routers stay frozen under the groups (adapting one changes the routing); name
# one explicitly to adapt it. Experts stored as stacked einsum weights are not dense layers and
# get no adapters.
ROUTER_NAMES = ("gate", "router")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (`lora.*` in a training config).

  Attributes:
    rank: adapter rank r (> 0; a training config's `lora.rank=0` means no LoRA at all).
    alpha: scaling numerator; the low-rank update is multiplied by `alpha / rank`, as in PEFT.
    targets: which dense layers get adapters (see the module docstring).
    dropout: dropout on the adapter input during training (PEFT's `lora_dropout`).
  """

  rank: int
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank={self.rank} must be >= 1 (0 turns LoRA off)")
    if not self.targets:
      raise ValueError("lora.targets is empty; name dense layers, 'attention', 'mlp' or 'all'")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, fields: dict[str, Any] | None) -> LoraConfig | None:
    if not fields:
      return None
    return cls(**{**fields, "targets": tuple(fields.get("targets", DEFAULT_TARGETS))})


def parse_targets(text: str) -> tuple[str, ...]:
  """`"attention,mlp"` -> ("attention", "mlp"): the comma-separated `lora.targets` key."""
  return tuple(t.strip() for t in text.split(",") if t.strip())


def from_config(lora: Any) -> LoraConfig | None:
  """The LoraConfig of a training config's `lora` group (None when `lora.rank` is 0)."""
  if not lora.rank:
    return None
  return LoraConfig(
    rank=int(lora.rank),
    alpha=float(lora.alpha),
    targets=parse_targets(lora.targets),
    dropout=float(lora.dropout),
  )


# ---------------------------------------------------------------------------------------------
# Which layers: names.
# ---------------------------------------------------------------------------------------------


def matches(target: str, path: Sequence[str]) -> bool:
  """Whether the dense layer at `path` (module names below `backbone`) is named by `target`."""
  parents = [p.lower() for p in path[:-1]]
  if target == "all":
    return path[-1] not in ROUTER_NAMES
  if target in GROUPS:
    if path[-1] in ROUTER_NAMES:
      return False
    return any(key in p for p in parents for key in GROUPS[target])
  tail = tuple(target.split("."))
  return tuple(path[-len(tail) :]) == tail


def is_trainable(path: Sequence[str]) -> bool:
  """With LoRA on: the adapters and everything outside the backbone (the head) train."""
  return path[-1] in ADAPTER_NAMES or path[0] != "backbone"


# ---------------------------------------------------------------------------------------------
# The forward pass: a method interceptor around DenseGeneral.
# ---------------------------------------------------------------------------------------------


def _kaiming_uniform_a(key, shape, dtype=jnp.float32):
  # PEFT: kaiming_uniform_(lora_A.weight, a=sqrt(5)) on [rank, fan_in] -> U(-1/sqrt(fan_in), ..).
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _normalise_axes(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


def _kernel_axis_names(module: nn.Module, ndim: int) -> tuple[str | None, ...]:
  # While initialising, the kernel is still boxed with its logical names; the adapters borrow them
  # (input axes for A, output axes for B) so that they shard like the kernel they adapt.
  kernel = module.get_variable("params", "kernel")
  names = getattr(kernel, "names", None)
  return tuple(names) if names is not None and len(names) == ndim else (None,) * ndim


def _low_rank_delta(module: nn.DenseGeneral, x: jax.Array, lora: LoraConfig) -> jax.Array:
  if module.batch_dims:
    raise ValueError(f"LoRA on {'/'.join(module.path)}: DenseGeneral batch_dims are not supported")
  in_axes = _normalise_axes(module.axis, x.ndim)
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  in_shape = tuple(x.shape[a] for a in in_axes)
  names = _kernel_axis_names(module, len(in_shape) + len(features))
  a = module.param(
    "lora_a",
    nn.with_logical_partitioning(_kaiming_uniform_a, names[: len(in_shape)] + (None,)),
    in_shape + (lora.rank,),
    jnp.float32,
  )
  b = module.param(
    "lora_b",
    nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,) + names[len(in_shape) :]),
    (lora.rank,) + features,
    jnp.float32,
  )
  dtype = module.dtype or x.dtype
  if lora.dropout > 0 and module.has_rng("dropout"):
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0)
  x_r = jax.lax.dot_general(
    x.astype(dtype), a.astype(dtype), ((in_axes, tuple(range(len(in_axes)))), ((), ()))
  )
  return jnp.tensordot(x_r, b.astype(dtype), axes=1) * jnp.asarray(lora.scale, dtype)


@dataclasses.dataclass
class Matches:
  """What the interceptor saw: targets that matched a layer, and every dense layer's path."""

  targets: set[str] = dataclasses.field(default_factory=set)
  dense_paths: set[str] = dataclasses.field(default_factory=set)


@contextlib.contextmanager
def adapters(cfg: ModelConfig) -> Iterator[Matches]:
  """Adds LoRA adapters to the targeted dense layers of modules called inside the block.

  Yields the `Matches` so far (to check the targets after initialisation). A no-op when
  `cfg.lora` is None.
  """
  lora = cfg.lora
  matched = Matches()
  if lora is None:
    yield matched
    return

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.DenseGeneral):
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if not path or path[0] != "backbone":
      return next_fun(*args, **kwargs)
    matched.dense_paths.add(".".join(p for p in path[1:] if p != "layers"))
    hits = [t for t in lora.targets if matches(t, path[1:])]
    if not hits:
      return next_fun(*args, **kwargs)
    matched.targets.update(hits)
    y = next_fun(*args, **kwargs)
    return y + _low_rank_delta(module, args[0], lora).astype(y.dtype)

  with nn.intercept_methods(intercept):
    yield matched


def check_targets(cfg: ModelConfig, matched: Matches) -> None:
  """Raises if a named `lora.targets` entry matched no dense layer of the backbone.

  A group (`attention`, `mlp`, `all`) that matches nothing only warns: e.g. the MLP of a
  mixture-of-experts model has no dense layer but its router.
  """
  missing = [t for t in cfg.lora.targets if t not in matched.targets]
  for group in [t for t in missing if t in GROUPS or t == "all"]:
    logging.warning("lora.targets: %r matches no dense layer of model.arch=%r", group, cfg.arch)
  missing = [t for t in missing if t not in GROUPS and t != "all"]
  if not matched.targets and not missing:
    missing = list(cfg.lora.targets)
  if missing:
    raise ValueError(
      f"lora.targets={','.join(cfg.lora.targets)}: {', '.join(missing)} matches no dense layer "
      f"of model.arch={cfg.arch!r}; its dense layers are {', '.join(sorted(matched.dense_paths))}"
    )


# ---------------------------------------------------------------------------------------------
# Parameters: counting, merging, and PEFT's layout.
# ---------------------------------------------------------------------------------------------


def adapter_modules(params: dict) -> Iterator[tuple[tuple[str, ...], dict]]:
  """(path, module params) of every module that carries adapters."""
  stack: list[tuple[tuple[str, ...], Any]] = [((), params)]
  while stack:
    path, node = stack.pop()
    if not isinstance(node, dict):
      continue
    if "lora_a" in node:
      yield path, node
    for key in sorted(node, reverse=True):
      stack.append((path + (key,), node[key]))


def low_rank_delta(kernel: Any, a: Any, b: Any, scale: float) -> np.ndarray:
  """`scale * A B` in the kernel's shape (leading stacked axes, e.g. layers, kept), float32."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  rank = a.shape[-1]
  lead_shape = a.shape[:lead]
  a2 = a.reshape(lead_shape + (-1, rank))
  b2 = b.reshape(lead_shape + (rank, -1))
  return (scale * (a2 @ b2)).reshape(kernel.shape)


def merge(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
  """A plain model: each kernel plus its `(alpha / rank) A B`, adapters dropped (host arrays)."""
  if cfg.lora is None:
    return cfg, params
  from jaxpref.models.convert import to_numpy  # gathers sharded (multi-process) arrays

  params = to_numpy(params)

  def fold(node):
    if not isinstance(node, dict):
      return node
    if "lora_a" in node:
      kernel = node["kernel"]
      delta = low_rank_delta(kernel, node["lora_a"], node["lora_b"], cfg.lora.scale)
      merged = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
      return {k: v for k, v in node.items() if k not in ADAPTER_NAMES} | {"kernel": merged}
    return {k: fold(v) for k, v in node.items()}

  return cfg.replace(lora=None), fold(params)


def count_trainable(cfg: ModelConfig, params: dict) -> tuple[int, int]:
  """(trainable, total) parameter counts: everything trains unless LoRA is on (`is_trainable`)."""
  trainable = total = 0
  for path, leaf in traverse_util.flatten_dict(params).items():
    total += int(np.prod(leaf.shape))
    if cfg.lora is None or is_trainable(path):
      trainable += int(np.prod(leaf.shape))
  return trainable, total


def without_adapters(tree: dict) -> dict:
  """`tree` (params, or anything shaped like them) with the adapter leaves dropped."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict(
    {path: leaf for path, leaf in flat.items() if path[-1] not in ADAPTER_NAMES}
  )


def with_fresh_adapters(cfg: ModelConfig, params: dict, rng: jax.Array) -> dict:
  """Base params (e.g. from a Hugging Face checkpoint) plus freshly initialised adapters.

  Meant to run under `jit`: the random base weights that `init_params` also draws are unused and
  compiled away, so only the adapters are materialised.
  """
  from jaxpref.models import reward_model

  flat = traverse_util.flatten_dict(params)
  if cfg.lora is None or any(path[-1] in ADAPTER_NAMES for path in flat):
    return params
  fresh = traverse_util.flatten_dict(reward_model.init_params(cfg, rng))
  adapters = {path: leaf for path, leaf in fresh.items() if path[-1] in ADAPTER_NAMES}
  return traverse_util.unflatten_dict(flat | adapters)
