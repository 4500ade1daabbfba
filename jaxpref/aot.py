"""`python -m jaxpref.aot --config=configs/X.py --topology=v4-8`: a memory and time plan before
renting TPUs.

Compiles the same jitted train step as `jaxpref.training.trainer` (same optimizer, state
shardings, batch sharding and donation) ahead of time for a TPU topology, on this CPU-only machine,
from abstract shapes only (`jax.eval_shape`: no weights are read or created), and reports per
device the bytes of the parameters, the optimizer state and XLA's memory analysis (temp /
argument / output bytes); then XLA's cost analysis of the compiled step (FLOPs, bytes accessed)
next to the model FLOPs (`jaxpref.training.flops`, every position counted as a real token) and a
roofline estimate of the step time from the chip's peak FLOP/s and HBM bandwidth
(`jaxpref.training.roofline`): compute- or memory-bound, and the MFU the roofline allows.

Compiling for a TPU topology needs `libtpu` importable. Without it the tool says so in one line and
compiles for the local devices instead (with `--num_cpu_devices=N`, N forced host CPU devices), on
the same mesh: the sharded bytes are the same, XLA's temp bytes are the CPU compiler's.
Shapes come from `model.preset` when set (no checkpoint needed), else from the `model.*` fields.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string(
  "topology",
  "v4-8",
  "TPU topology: a Cloud accelerator type (v4-8, v5e-8, v5litepod-16, v5p-8, v6e-8) or a "
  "libtpu topology name (v5e:2x4, v5p:2x2x1; what get_topology_desc accepts).",
)
flags.DEFINE_string(
  "chip",
  "",
  "Roofline chip (v4, v5e, v5p, v6e, h100, h200); empty = the topology's.",
)
flags.DEFINE_string("chip_config", "default", "Chip config name for get_topology_desc.")
flags.DEFINE_integer(
  "num_cpu_devices",
  0,
  "Fallback without libtpu: force this many host CPU devices (0 = as many as "
  "the name vX-N says, else the local devices).",
)
flags.DEFINE_string("json_out", None, "Also write the report as JSON to this file.")
flags.DEFINE_boolean("force_cpu", False, "Skip the TPU topology even if libtpu is importable.")

LIBTPU_MISSING = (
  "jaxpref.aot: libtpu is not importable, so no TPU topology can be compiled for; "
  "compiling for {n} local CPU devices with the same mesh instead "
  "(pip install libtpu for the real TPU plan)."
)


@dataclass
class Plan:
  """The numbers of one AOT compilation (bytes are per device unless named `total`)."""

  target: str
  num_devices: int
  mesh: dict[str, int]
  param_count: int
  trainable_param_count: int
  param_bytes_total: int
  param_bytes_per_device: int
  opt_state_bytes_total: int
  opt_state_bytes_per_device: int
  temp_bytes: int | None
  argument_bytes: int | None
  output_bytes: int | None
  alias_bytes: int | None
  generated_code_bytes: int | None
  # Cost and roofline (per device unless named `total`; None where unknown).
  attention: str = ""
  batch: str = ""  # "padded [b, n, L]" or "packed [R, L]" (the trainer's layout for this config)
  xla_flops_loop_once: float | None = None  # cost_analysis() as compiled: loop bodies once
  xla_flops: float | None = None
  xla_bytes_accessed: float | None = None
  model_flops_total: float | None = None
  model_flops: float | None = None
  xla_to_model_flops: float | None = None
  chip: str | None = None
  peak_flops: float | None = None
  hbm_bandwidth: float | None = None
  roofline_compute_s: float | None = None
  roofline_memory_s: float | None = None
  roofline_step_s: float | None = None
  bound: str | None = None
  mfu_at_roofline: float | None = None
  custom_calls: list[str] = dataclasses.field(default_factory=list)  # kernels in the program
  note: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dict(self.__dict__)


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


# Chips of a v5e / v6e slice -> libtpu topology; v5p slices are named by TensorCores (2 per chip).
_GRID_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}


def tpu_topology(name: str) -> str:
  """A Cloud accelerator type as a libtpu topology name (`v5e-8` -> `v5e:2x4`, `v5p-8` ->
  `v5p:2x2x1`); other names (`v4-8`, `v5e:2x4`) unchanged."""
  head, _, tail = name.rpartition("-")
  if not tail.isdigit():
    return name
  n, family = int(tail), head.replace("litepod", "e")
  if family in ("v5e", "v6e") and n in _GRID_2D:
    return f"{family}:{_GRID_2D[n]}"
  if family == "v5p" and n // 2 in _GRID_3D:
    return f"v5p:{_GRID_3D[n // 2]}"
  return name


def topology_devices(topology: str) -> int | None:
  """JAX devices of a topology: `v4-8` has 8 (one per TensorCore), `v5e-8` / `v5e:2x4` 8 (one
  per chip), `v5p-8` / `v5p:2x2x1` 4 (one per megacore chip); None where unknown."""
  name = tpu_topology(topology)
  head, sep, grid = name.partition(":")
  if sep and all(d.isdigit() for d in grid.split("x")):
    return math.prod(int(d) for d in grid.split("x"))
  head, _, tail = name.rpartition("-")
  return int(tail) if head and tail.isdigit() else None


def _nbytes(leaf) -> int:
  return math.prod(leaf.shape) * leaf.dtype.itemsize


def _bytes_per_device(leaf, sharding) -> int:
  shard_shape = sharding.shard_shape(leaf.shape)
  return math.prod(shard_shape) * leaf.dtype.itemsize


def _tree_bytes(abstract_tree, shardings_tree) -> tuple[int, int]:
  import jax

  leaves = jax.tree.leaves(abstract_tree)
  shardings = jax.tree.leaves(shardings_tree)
  total = sum(_nbytes(x) for x in leaves)
  per_device = sum(_bytes_per_device(x, s) for x, s in zip(leaves, shardings, strict=True))
  return total, per_device


def num_tasks_of(config) -> int:
  """Tasks the step is compiled for (without reading the data: a domain-specific file, which
  gives several tasks, counts as one unless `data.tasks` names them)."""
  if config.data.get("tasks"):
    return len([t for t in config.data.tasks.split(",") if t.strip()])
  if config.data.task_names:
    return len([t for t in config.data.task_names.split(",") if t])
  from jaxpref.training.data import split_files

  return max(1, len(split_files(config.data.files)))


def _cost(compiled) -> dict[str, float]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends have none; the plan says n/a
    return {}
  if isinstance(cost, list | tuple):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _compile(config, model_cfg, mesh):
  """The trainer's own step (same builder), lowered from abstract shapes and compiled."""
  import jax
  import jax.numpy as jnp

  from jaxpref import sharding
  from jaxpref.data.batch import PackedBatch, PaddedBatch
  from jaxpref.training import step as train_step_lib

  # The schedule's length changes no shape; any positive step count compiles the same program.
  program = train_step_lib.build_from_config(
    config,
    model_cfg,
    num_tasks=num_tasks_of(config),
    total_steps=max(1, config.train.steps),
    mesh=mesh,
  )
  b, length = config.train.batch_size, config.data.max_length
  n = config.data.get("responses_per_item") or 2  # 0 = the data's largest; pairs without data.
  if config.data.get("packing"):
    # Packed rows (the trainer's default): as many rows as responses, the most a batch of
    # full-length responses needs, so the plan is the worst case; shared prompts give branch ids.
    multiple = sharding.global_batch_size_multiple(mesh)
    rows = -(-b * n // multiple) * multiple
    shapes = {
      "input_ids": ((rows, length), jnp.int32),
      "segment_ids": ((rows, length), jnp.int32),
      "branch_ids": ((rows, length), jnp.int32),
      "positions": ((rows, length), jnp.int32),
      "last_index": ((b * n,), jnp.int32),
      "lengths": ((b, n), jnp.int32),
      "scores": ((b, n), jnp.float32),
      "task_ids": ((b,), jnp.int32),
    }
    batch_type = PackedBatch
  else:
    shapes = {
      "input_ids": ((b, n, length), jnp.int32),
      "attention_mask": ((b, n, length), jnp.int32),
      "scores": ((b, n), jnp.float32),
      "task_ids": ((b,), jnp.int32),
    }
    batch_type = PaddedBatch
  abstract_batch = batch_type(
    **{
      name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape))
      for name, (shape, dtype) in shapes.items()
    }
  )
  lowered = program.step_fn.lower(program.abstract_sharded_state(), abstract_batch)
  return program, lowered.compile()


def step_cost(config, model_cfg, mesh) -> dict[str, float]:
  """XLA's FLOPs and bytes accessed of one step, per device, with every layer counted.

  XLA's cost analysis counts the body of a loop once, and the layers are one `nn.scan` loop; so
  the step is compiled again with 1 and 2 layers unrolled, and the cost of N layers is
  cost(1) + (N - 1) * (cost(2) - cost(1)). Gradient accumulation (a loop over micro-batches)
  multiplies the whole, optimizer update included (a small overcount).
  """
  from jaxpref.models import layers

  costs = []
  for num_layers in (1, 2):
    small = model_cfg.replace(num_layers=num_layers, layer_types=model_cfg.layer_types[:num_layers])
    with layers.unrolled_layers():
      costs.append(_cost(_compile(config, small, mesh)[1]))
  out = {}
  for key in ("flops", "bytes accessed"):
    if key in costs[0] and key in costs[1]:
      one, two = costs[0][key], costs[1][key]
      out[key] = (one + (model_cfg.num_layers - 1) * (two - one)) * config.train.grad_accum_steps
  return out


def plan(config, devices, target: str, chip_name: str = "") -> Plan:
  """Lowers and compiles the train step for `devices` from abstract inputs; returns the numbers.

  `chip_name`: the roofline's chip (`jaxpref.training.roofline.chip_for`); empty = the devices'
  own (TPU), else none.
  """
  import jax

  from jaxpref import sharding
  from jaxpref.models import attention, lora
  from jaxpref.models.source import model_config_from_config
  from jaxpref.training import data as train_data
  from jaxpref.training import flops, roofline

  # LoRA (lora.rank > 0): adapters added, optimizer state only for what trains.
  model_cfg = model_config_from_config(config.model).replace(lora=lora.from_config(config.lora))
  # Packing as the trainer settles it (off for encoders, other poolings, grad accumulation).
  if "packing" in config.data:
    with config.unlocked():
      train_data.settle_packing(config, model_cfg)
  mesh = sharding.make_mesh(
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=list(devices)
  )
  program, compiled = _compile(config, model_cfg, mesh)
  abstract_state, state_shardings = program.abstract_state, program.state_shardings
  b, length = config.train.batch_size, config.data.max_length
  n = config.data.get("responses_per_item") or 2
  memory = compiled.memory_analysis()
  get = lambda name: None if memory is None else int(getattr(memory, name, 0) or 0)

  param_total, param_per_device = _tree_bytes(abstract_state.params, state_shardings.params)
  opt_total, opt_per_device = _tree_bytes(abstract_state.opt_state, state_shardings.opt_state)

  packed = bool(config.data.get("packing"))
  multiple = sharding.global_batch_size_multiple(mesh)
  rows = -(-b * n // multiple) * multiple  # as `_compile` lays them out
  batch_layout = f"packed [{rows}, {length}]" if packed else f"padded [{b}, {n}, {length}]"
  with attention.kernel_mesh(mesh):  # the implementation the step's trace chose
    impl = attention.choose(model_cfg, length=length, packed=packed, log=False)
  compiled_cost, cost = _cost(compiled), step_cost(config, model_cfg, mesh)
  xla_flops, xla_bytes = cost.get("flops"), cost.get("bytes accessed")
  model_total = flops.train_flops(model_cfg, [length] * (b * n))
  model_per_device = model_total / len(devices)
  device = devices[0]
  chip = roofline.chip_for(chip_name or (device.device_kind if device.platform == "tpu" else ""))
  notes = []
  if impl == "splash":
    notes.append("XLA's cost analysis does not count the Pallas attention kernel's FLOPs")
  if device.platform != "tpu":
    notes.append(f"costs are the {device.platform} compiler's, not a TPU's")
  roof = None
  if chip is not None and xla_flops and xla_bytes:
    # TensorCores per JAX device: a TPU device says; the CPU stand-in follows libtpu's default
    # chip configs (v4: one per core; v5p: megacore, one per chip).
    cores = getattr(device, "num_cores", None) if device.platform == "tpu" else None
    if cores is None and chip is roofline.CHIPS["v4"]:
      cores = 1
    roof = roofline.estimate(
      chip,
      xla_flops=xla_flops,
      xla_bytes=xla_bytes,
      model_flops=model_per_device,
      cores_per_device=cores,
    )
  return Plan(
    target=target,
    num_devices=len(devices),
    mesh={k: int(v) for k, v in mesh.shape.items()},
    param_count=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)),
    trainable_param_count=lora.count_trainable(model_cfg, abstract_state.params)[0],
    param_bytes_total=param_total,
    param_bytes_per_device=param_per_device,
    opt_state_bytes_total=opt_total,
    opt_state_bytes_per_device=opt_per_device,
    temp_bytes=get("temp_size_in_bytes"),
    argument_bytes=get("argument_size_in_bytes"),
    output_bytes=get("output_size_in_bytes"),
    alias_bytes=get("alias_size_in_bytes"),
    generated_code_bytes=get("generated_code_size_in_bytes"),
    attention=impl,
    batch=batch_layout,
    xla_flops_loop_once=compiled_cost.get("flops"),
    xla_flops=xla_flops,
    xla_bytes_accessed=xla_bytes,
    model_flops_total=model_total,
    model_flops=model_per_device,
    xla_to_model_flops=(xla_flops / model_per_device) if xla_flops else None,
    chip=None if roof is None else roof.chip,
    peak_flops=None if roof is None else roof.peak_flops_per_device,
    hbm_bandwidth=None if roof is None else roof.hbm_bandwidth_per_device,
    roofline_compute_s=None if roof is None else roof.compute_s,
    roofline_memory_s=None if roof is None else roof.memory_s,
    roofline_step_s=None if roof is None else roof.step_s,
    bound=None if roof is None else roof.bound,
    mfu_at_roofline=None if roof is None else roof.mfu_at_roofline,
    custom_calls=sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))),
    note="; ".join(notes),
  )


def _gib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**30:.3f} GiB ({n:,} B)"


def _num(x: float | None, unit: str = "", digits: int = 3) -> str:
  if x is None:
    return "n/a"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
    if abs(x) >= scale:
      return f"{x / scale:.{digits}g} {prefix}{unit}"
  return f"{x:.{digits}g} {unit}".strip()


def _ms(s: float | None) -> str:
  return "n/a" if s is None else f"{s * 1e3:.4g} ms"


def markdown(p: Plan) -> str:
  rows = [
    ("target", p.target),
    ("devices", str(p.num_devices)),
    ("mesh", str(p.mesh)),
    ("parameters", f"{p.param_count:,}"),
    ("trainable parameters", f"{p.trainable_param_count:,}"),
    ("params total", _gib(p.param_bytes_total)),
    ("params / device", _gib(p.param_bytes_per_device)),
    ("optimizer state / device", _gib(p.opt_state_bytes_per_device)),
    ("XLA argument / device", _gib(p.argument_bytes)),
    ("XLA output / device", _gib(p.output_bytes)),
    ("XLA alias (donated) / device", _gib(p.alias_bytes)),
    ("XLA temp / device", _gib(p.temp_bytes)),
    ("batch", p.batch),
    ("attention", p.attention),
    ("custom calls", ", ".join(p.custom_calls) or "none"),
    ("XLA FLOPs / device", _num(p.xla_flops, "FLOP")),
    ("model FLOPs / device", _num(p.model_flops, "FLOP")),
    ("XLA / model FLOPs", "n/a" if p.xla_to_model_flops is None else f"{p.xla_to_model_flops:.2f}"),
    ("XLA bytes accessed / device", _num(p.xla_bytes_accessed, "B")),
    ("roofline chip", p.chip or "n/a (--chip=v5e|v5p|...)"),
    ("peak / device", _num(p.peak_flops, "FLOP/s")),
    ("HBM bandwidth / device", _num(p.hbm_bandwidth, "B/s")),
    ("roofline: compute time", _ms(p.roofline_compute_s)),
    ("roofline: memory time", _ms(p.roofline_memory_s)),
    ("roofline step time", f"{_ms(p.roofline_step_s)} ({p.bound or 'n/a'}-bound)"),
    ("MFU at the roofline", "n/a" if p.mfu_at_roofline is None else f"{p.mfu_at_roofline:.1%}"),
  ]
  if p.note:
    rows.append(("note", p.note))
  return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required")
  from jaxpref.training import config as train_config

  train_config.validate(FLAGS.config)
  use_tpu = libtpu_available() and not FLAGS.force_cpu
  if not use_tpu:
    n = FLAGS.num_cpu_devices or topology_devices(FLAGS.topology) or 0
    if n and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      # Must be set before jax starts its CPU backend (jax is imported lazily for this reason).
      os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
      ).strip()
  import jax

  if use_tpu:
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
      tpu_topology(FLAGS.topology), "tpu", chip_config_name=FLAGS.chip_config
    )
    devices, target = topology.devices, f"tpu {FLAGS.topology}"
  else:
    devices = jax.devices("cpu")
    if not libtpu_available():
      print(LIBTPU_MISSING.format(n=len(devices)), file=sys.stderr)
    target = f"cpu x{len(devices)} (stand-in for {FLAGS.topology})"
  # The CPU stand-in's roofline uses the chip the topology names.
  chip = FLAGS.chip or ("" if use_tpu else FLAGS.topology)
  try:
    result = plan(FLAGS.config, devices, target, chip)
  except Exception as e:  # noqa: BLE001 - XLA's out-of-memory is a JaxRuntimeError
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The answer to "will it fit?" is no: one line with XLA's numbers, not a traceback.
    detail = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
    print(f"jaxpref.aot: error: the step does not fit on {target}: {detail}", file=sys.stderr)
    sys.exit(2)
  print(markdown(result))
  text = json.dumps(result.to_dict(), indent=2)
  print(text)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  from jaxpref import cli

  app.run(
    lambda argv: cli.run_main("jaxpref.aot", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.aot"),
  )
