"""Memory plan: bytes per device of parameters, AdamW state, gradients and activations.

Parameters come from `jax.eval_shape` of the real model (`reward_model.abstract_params`), and each
one is split exactly as training splits it: its logical axes (`reward_model.logical_axes`) go
through `jaxpref.sharding.logical_to_mesh_spec` on a stand-in mesh (only `.shape` is read, so no
devices are needed). AdamW keeps two moments (mu, nu) shaped and sharded like the parameters;
gradients are sharded like the parameters too (XLA reduce-scatters them under FSDP).

Activations are an estimate, not a measurement. Per layer and per token (elements, in the compute
dtype), what the backward pass keeps:
  replicated over `tensor`: 5h (norm inputs/outputs, residual, attention output projection)
  split over `tensor`:      4h (q, k, v, attention output) + 2 * heads * s (scores and softmax)
                            + m * I (MLP intermediates: m = 2 for GELU, 3 for gated SiLU)
(after Korthikanti et al. 2022, "Reducing Activation Recomputation", without dropout masks).
Tokens per device = global_batch * responses * seq_len / (data * fsdp).
  no remat:  layers * per_layer
  remat:     layers * h (each layer's input) + one layer's per_layer (recomputed in backward)
Embedding output and the reward head are left out (one h per token; negligible).

With `--lora_rank R` (LoRA, `jaxpref.models.lora`) the parameters include the adapters, but only
the trainable part (adapters and reward head) has gradients and AdamW moments; the frozen base is
stored in `--param_dtype` and counted once.

  .venv/bin/python benchmarks/memory_plan.py --json /tmp/memory_plan.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jaxpref import sharding
from jaxpref.models import lora, presets, reward_model
from jaxpref.training import trainable

GIB = 1024**3
DEFAULT_PRESETS = ("pythia-1.4b", "pythia-2.8b", "pythia-6.9b", "llama-2-7b")
DEFAULT_MESHES = ("1,8,1", "1,8,4", "1,64,1")  # data,fsdp,tensor


@dataclasses.dataclass(frozen=True)
class FakeMesh:
  """What `logical_to_mesh_spec` reads from a mesh: the size of every named axis."""

  shape: dict[str, int]


def parse_mesh(text: str) -> FakeMesh:
  try:
    data, fsdp, tensor = (int(x) for x in text.split(","))
  except ValueError:
    sys.exit(f"--meshes: {text!r} is not data,fsdp,tensor (three integers)")
  return FakeMesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def param_bytes_per_device(abstract, logical, mesh: FakeMesh) -> tuple[int, int]:
  """(total parameter bytes, bytes on one device) under jaxpref's sharding rules."""
  total = per_device = 0
  leaves = jax.tree.leaves(abstract)
  specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for leaf, spec in zip(leaves, specs, strict=True):
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    mesh_spec = sharding.logical_to_mesh_spec(spec, leaf.shape, mesh)
    split = 1
    for axes in mesh_spec:
      for axis in (axes,) if isinstance(axes, str) else axes or ():
        split *= mesh.shape[axis]
    total += nbytes
    per_device += nbytes // split
  return total, per_device


def activation_bytes(
  cfg, mesh: FakeMesh, global_batch: int, responses: int, seq_len: int, remat: bool
) -> int:
  """The documented estimate (module docstring) of saved activations on one device."""
  h, heads, inter = cfg.hidden_size, cfg.num_heads, cfg.intermediate_size
  mlp_factor = 3 if cfg.arch == "llama" else 2
  tp = mesh.shape["tensor"]
  tokens = global_batch * responses * seq_len / (mesh.shape["data"] * mesh.shape["fsdp"])
  per_token = 5 * h + (4 * h + 2 * heads * seq_len + mlp_factor * inter) / tp
  per_layer = tokens * per_token
  itemsize = np.dtype(cfg.dtype).itemsize if cfg.dtype != "bfloat16" else 2
  elements = cfg.num_layers * tokens * h + per_layer if remat else cfg.num_layers * per_layer
  return int(elements * itemsize)


def plan(name: str, mesh: FakeMesh, args) -> dict:
  cfg = presets.preset(name, param_dtype=args.param_dtype, dtype=args.dtype)
  if args.lora_rank:
    targets = lora.parse_targets(args.lora_targets)
    cfg = cfg.replace(lora=lora.LoraConfig(rank=args.lora_rank, targets=targets))
  abstract = reward_model.abstract_params(cfg)
  logical = reward_model.logical_axes(cfg)
  total, params = param_bytes_per_device(abstract, logical, mesh)
  # AdamW's mu and nu have the trainable parameters' shapes and dtypes and are sharded like them;
  # so are the gradients (all parameters without LoRA).
  _, trained = param_bytes_per_device(
    trainable.trainable_params(cfg, abstract), trainable.trainable_params(cfg, logical), mesh
  )
  optimizer, grads = 2 * trained, trained
  act = {
    r: activation_bytes(cfg, mesh, args.global_batch, args.responses, args.seq_len, r)
    for r in (False, True)
  }
  devices = math.prod(mesh.shape.values())
  return {
    "preset": name,
    "mesh": dict(mesh.shape),
    "devices": devices,
    "lora_rank": args.lora_rank,
    "num_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))),
    "num_trainable_params": lora.count_trainable(cfg, abstract)[0],
    "param_bytes_total": total,
    "params_per_device": params,
    "optimizer_per_device": optimizer,
    "grads_per_device": grads,
    "activations_per_device": act[False],
    "activations_remat_per_device": act[True],
    "total_per_device": params + optimizer + grads + act[False],
    "total_remat_per_device": params + optimizer + grads + act[True],
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
  parser.add_argument(
    "--meshes", nargs="+", default=list(DEFAULT_MESHES), help="data,fsdp,tensor sizes, e.g. 1,8,4"
  )
  parser.add_argument("--global_batch", type=int, default=64, help="preference items per step")
  parser.add_argument("--responses", type=int, default=2, help="responses per item (N)")
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--param_dtype", default="float32")
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype (activations)")
  parser.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
  parser.add_argument("--lora_targets", default="attention,mlp", help="LoRA's lora.targets")
  parser.add_argument("--smoke", action="store_true", help="one preset, one mesh (CI)")
  parser.add_argument("--json", type=Path, default=None, help="also write the results here")
  args = parser.parse_args(argv)
  if args.smoke:
    args.presets, args.meshes = ["pythia-1.4b"], ["1,8,1"]
  rows = [plan(name, parse_mesh(m), args) for name in args.presets for m in args.meshes]

  print(
    f"GiB per device; batch {args.global_batch}x{args.responses} x {args.seq_len} tokens, "
    f"params {args.param_dtype}, activations {args.dtype}"
    + (f", LoRA rank {args.lora_rank} on {args.lora_targets}" if args.lora_rank else "")
  )
  head = (
    f"{'preset':<12} {'mesh d,f,t':>10} {'params':>7} {'adamw':>7} {'grads':>7} "
    f"{'act':>7} {'act remat':>9} {'total':>7} {'total remat':>11}"
  )
  print(head)
  for r in rows:
    mesh = ",".join(str(v) for v in r["mesh"].values())
    gib = {k: r[k] / GIB for k in r if k.endswith("per_device")}
    print(
      f"{r['preset']:<12} {mesh:>10} {gib['params_per_device']:>7.2f} "
      f"{gib['optimizer_per_device']:>7.2f} {gib['grads_per_device']:>7.2f} "
      f"{gib['activations_per_device']:>7.2f} {gib['activations_remat_per_device']:>9.2f} "
      f"{gib['total_per_device']:>7.2f} {gib['total_remat_per_device']:>11.2f}"
    )
  result = {
    "benchmark": "memory_plan",
    "argv": sys.argv[1:] if argv is None else argv,
    "smoke": args.smoke,
    "global_batch": args.global_batch,
    "responses": args.responses,
    "seq_len": args.seq_len,
    "param_dtype": args.param_dtype,
    "dtype": args.dtype,
    "lora_rank": args.lora_rank,
    "lora_targets": args.lora_targets if args.lora_rank else "",
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "rows": rows,
  }
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
