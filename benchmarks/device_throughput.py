"""Accelerator training throughput: an 8B-class reward model, jaxpref's step vs a PyTorch loop.

On one GPU (or a TPU VM, or the CPU with `--smoke`), in a few minutes: a Llama-3-8B-shaped (or
any `jaxpref.models.presets` name) reward model from random init, bf16 weights and compute,
rematerialised layers, `model.attention=auto` (cuDNN on GPU, splash on TPU), trained on packed
batches with shared prompts (the trainer's defaults; `--no_shared_prompts` packs each response
whole) by the trainer's own step (`jaxpref.training.step.build_from_config`: ranking loss,
AdamW, global-norm clipping). Next to it, in the same run where torch with CUDA is installed,
the transformers `*ForSequenceClassification` of the same shape in bf16 with gradient
checkpointing and SDPA attention, trained on the same pairs (each batch padded to its longest
row, as `DataCollatorWithPadding` does; AdamW, same clipping).

Batches: the shared helpful + harmless pairs (GPT-2 tokenizer ids, which fit every preset's
vocabulary) through jaxpref's pipeline, or, without the shared data, random token ids of random
lengths (labelled `synthetic` in the JSON). jaxpref packs every batch into the same number of
rows of `--max_length` tokens (one compiled shape); packing happens before timing (the trainer
packs in its prefetch threads).

Printed and written (`--json`): step time, real (non-pad) tokens/s and MFU counting real tokens
only (`jaxpref.training.flops`: 6 N per token plus causal attention over each response whole,
i.e. the work a trainer without shared prompts does, so with shared prompts it is useful work,
not hardware utilisation; the device's dense bf16 peak from `flops.PEAK_FLOPS`), per side, and
their ratio.

  # One H200 (an 80 GB H100: --batch_size=32; bf16 weights, gradients and AdamW moments of
  # 7.5B parameters take 60 GB before activations):
  CUDA_VISIBLE_DEVICES=0 python benchmarks/device_throughput.py --preset=llama-3-8b \
      --json /tmp/device_throughput.json
  # A TPU VM (all its chips on the fsdp axis; no PyTorch side): see docs/launch.md.
  # CPU smoke run (tiny Llama, both sides on the CPU):
  python benchmarks/device_throughput.py --smoke --json /tmp/device_smoke.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (the shared batches and pad id of the CPU benchmark)

PAD_ID = train_throughput.PAD_ID
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 1e-5, 0.01, 1.0
# --smoke: a tiny Llama in the Hugging Face config format (as the presets are).
TINY_LLAMA = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "num_hidden_layers": 2,
  "hidden_act": "silu",
  "max_position_embeddings": 1024,
  "rms_norm_eps": 1e-5,
  "vocab_size": 50304,
  "tie_word_embeddings": False,
}


def hf_config(args) -> dict:
  from jaxpref.models import presets

  return dict(TINY_LLAMA if args.smoke else presets.PRESETS[args.preset])


def make_batches(args, work: Path) -> tuple[list[dict[str, np.ndarray]], str]:
  """`steps + warmup` padded batches [b, 2, L]: the shared pairs, else synthetic ones."""
  steps = args.steps + args.warmup
  if train_throughput.TOKENIZER_FILE.is_file():
    path = work / "batches.npz"
    limit = 200 if args.smoke else None
    train_throughput.make_batches(path, steps, args.batch_size, args.max_length, limit, 64)
    return train_throughput.load_batches(path), "shared helpful + harmless"
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(steps):
    lengths = rng.integers(16, args.max_length // 2, (args.batch_size, 2))
    mask = (np.arange(args.max_length)[None, None] < lengths[..., None]).astype(np.int32)
    ids = rng.integers(1, 50000, mask.shape) * mask
    batches.append(
      {
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask,
        "scores": np.tile(np.array([1.0, 0.0], np.float32), (args.batch_size, 1)),
        "task_ids": np.zeros(args.batch_size, np.int32),
      }
    )
  return batches, "synthetic"


def run_jax(args, batches) -> dict:
  import jax

  from jaxpref import sharding
  from jaxpref.data import packing
  from jaxpref.models import attention, hf_io
  from jaxpref.training import data as train_data
  from jaxpref.training import flops
  from jaxpref.training import step as train_step_lib
  from jaxpref.training.config import base_config

  dtype = "float32" if args.smoke else "bfloat16"
  cfg = hf_io.from_hf(
    hf_config(args), dtype=dtype, param_dtype=dtype, remat=not args.smoke, attention=args.attention
  )
  config = base_config()
  config.loss.kind = "ranking"
  config.train.learning_rate = LEARNING_RATE
  config.train.weight_decay = WEIGHT_DECAY
  config.train.schedule = "constant"
  config.train.grad_clip = GRAD_CLIP
  config.data.max_length = args.max_length
  config.data.packing = True
  config.data.shared_prompts = args.shared_prompts
  # Every local device on the fsdp axis (one GPU: a mesh of one; a TPU VM: weights and moments
  # sharded over its chips).
  mesh = sharding.make_mesh(1, -1, 1)
  total = len(batches)
  program = train_step_lib.build_from_config(config, cfg, num_tasks=2, total_steps=total, mesh=mesh)
  t0 = time.perf_counter()
  state = program.init(jax.random.key(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0

  # One row count for every batch: one compiled shape.
  multiple = sharding.global_batch_size_multiple(mesh)
  pack = functools.partial(
    packing.pack_batch, row_length=args.max_length, share_prompts=args.shared_prompts
  )
  rows = max(pack(b).input_ids.shape[0] for b in batches)
  rows = -(-rows // multiple) * multiple
  packed = [train_data.global_batch(pack(b, num_rows=rows), mesh) for b in batches]
  t0 = time.perf_counter()
  compiled = program.step_fn.lower(state, packed[0]).compile()
  compile_s = time.perf_counter() - t0
  for batch in packed[: args.warmup]:
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics["loss"])
  times, losses = [], []
  for batch in packed[args.warmup :]:
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))  # Syncs, as a logging loop would.
    times.append(time.perf_counter() - t0)
  timed = batches[args.warmup :]
  lengths = [int(n) for b in timed for n in np.asarray(b["attention_mask"]).sum(-1).ravel()]
  device = jax.devices()[0]
  return {
    "step_s": times,
    "losses": losses,
    "init_s": init_s,
    "compile_s": compile_s,
    "rows": [rows, args.max_length],
    "positions": rows * args.max_length * len(timed),
    "attention": attention.choose(cfg, length=args.max_length, packed=True),
    "model_flops": flops.train_flops(cfg, lengths),
    "device_kind": device.device_kind,
    "num_devices": jax.device_count(),
    "platform": device.platform,
    "num_params": sum(int(x.size) for x in jax.tree.leaves(state.params)),
  }


def torch_device() -> str | None:
  """'cuda' where torch sees a GPU; None without torch or CUDA."""
  try:
    import torch
  except ImportError:
    return None
  return "cuda" if torch.cuda.is_available() else None


def run_torch(args, batches, device: str) -> dict:
  """transformers in bf16 (fp32 for --smoke on CPU), gradient checkpointing, SDPA, AdamW."""
  import torch
  import transformers
  from torch.nn import functional as F

  torch.manual_seed(0)
  hf = hf_config(args)
  model_type = hf.pop("model_type")
  hf.pop("architectures", None)
  config = transformers.AutoConfig.for_model(model_type, **hf, num_labels=1, pad_token_id=PAD_ID)
  dtype = torch.float32 if args.smoke else torch.bfloat16
  t0 = time.perf_counter()
  with torch.device(device):
    model = transformers.AutoModelForSequenceClassification.from_config(
      config, attn_implementation="sdpa"
    ).to(dtype)
  if not args.smoke:
    model.gradient_checkpointing_enable()
  model.config.use_cache = False
  model.train()
  init_s = time.perf_counter() - t0
  matrices = [p for p in model.parameters() if p.ndim > 1]
  vectors = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.AdamW(
    [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": vectors, "weight_decay": 0.0}],
    lr=LEARNING_RATE,
    fused=device == "cuda",
  )

  def to_torch(batch):
    b, n, _ = batch["input_ids"].shape
    mask = batch["attention_mask"].reshape(b * n, -1)
    longest = int(mask.sum(-1).max())
    ids = np.full((b * n, longest), PAD_ID, np.int64)
    att = np.zeros((b * n, longest), np.int64)
    for r, row in enumerate(batch["input_ids"].reshape(b * n, -1)):
      real = row[mask[r] == 1]
      ids[r, : len(real)], att[r, : len(real)] = real, 1
    return (
      torch.from_numpy(ids).to(device),
      torch.from_numpy(att).to(device),
      torch.from_numpy(batch["scores"]).to(device),
    )

  def step(batch):
    ids, att, scores_bn = to_torch(batch)
    rewards_bn = model(input_ids=ids, attention_mask=att).logits.float().reshape(scores_bn.shape)
    first_wins = scores_bn[:, 0] > scores_bn[:, 1]
    diff_b = torch.where(
      first_wins, rewards_bn[:, 0] - rewards_bn[:, 1], rewards_bn[:, 1] - rewards_bn[:, 0]
    )
    valid_b = (scores_bn[:, 0] != scores_bn[:, 1]) & (scores_bn.min(-1).values >= 0)
    loss = -(F.logsigmoid(diff_b) * valid_b).sum() / valid_b.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return loss.item()  # Syncs.

  for batch in batches[: args.warmup]:
    step(batch)
  times, losses = [], []
  for batch in batches[args.warmup :]:
    t0 = time.perf_counter()
    losses.append(step(batch))
    times.append(time.perf_counter() - t0)
  timed = batches[args.warmup :]
  positions = sum(
    int(b["attention_mask"][..., 0].size * b["attention_mask"].sum(-1).max()) for b in timed
  )
  return {
    "step_s": times,
    "losses": losses,
    "init_s": init_s,
    "positions": positions,
    "device": torch.cuda.get_device_name() if device == "cuda" else device,
  }


def summarise(side: dict, real_tokens: int, model_flops: float, peak: float | None) -> dict:
  total = sum(side["step_s"])
  return {
    "median_step_s": round(statistics.median(side["step_s"]), 4),
    "total_s": round(total, 3),
    "real_tokens_per_s": round(real_tokens / total, 1),
    "real_token_fraction": round(real_tokens / side["positions"], 3),
    "model_tflops_per_s": round(model_flops / total / 1e12, 3),
    "mfu": round(model_flops / total / peak, 4) if peak else None,
    "first_loss": round(side["losses"][0], 5),
    "last_loss": round(side["losses"][-1], 5),
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="llama-3-8b", help="jaxpref.models.presets name")
  parser.add_argument("--steps", type=int, default=8, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
  parser.add_argument("--batch_size", type=int, default=64, help="pairs per step")
  parser.add_argument("--max_length", type=int, default=2048, help="packed row length")
  parser.add_argument("--attention", default="auto", help="model.attention")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
  parser.add_argument(
    "--no_shared_prompts",
    dest="shared_prompts",
    action="store_false",
    help="pack every response whole (data.shared_prompts=False)",
  )
  parser.add_argument("--smoke", action="store_true", help="tiny Llama, CPU, 2 steps (CI)")
  parser.add_argument("--json", type=Path, default=None, help="also write the results here")
  args = parser.parse_args(argv)
  if args.smoke:
    args.steps, args.warmup, args.batch_size, args.max_length = 2, 1, 4, 128

  from jaxpref.training import flops

  with tempfile.TemporaryDirectory() as tmp:
    batches, source = make_batches(args, Path(tmp))
  jax_side = run_jax(args, batches)
  timed = batches[args.warmup :]
  real_tokens = sum(int(b["attention_mask"].sum()) for b in timed)
  model_flops, peak = jax_side["model_flops"], flops.peak_flops(jax_side["device_kind"])
  peak = peak * jax_side["num_devices"] if peak else None  # the PyTorch side runs on one GPU
  sides = {"jaxpref": summarise(jax_side, real_tokens, model_flops, peak)}
  # The baseline on CUDA; --smoke runs it on the CPU so that its code path is exercised.
  device = "cpu" if args.smoke else torch_device()
  torch_note = "skipped (--no_torch)" if args.no_torch else "no torch with CUDA here"
  if device is not None and not args.no_torch:
    torch_side = run_torch(args, batches, device)
    one_device = peak / jax_side["num_devices"] if peak else None
    sides["PyTorch"] = summarise(torch_side, real_tokens, model_flops, one_device)
    torch_note = f"transformers on {torch_side['device']}"
  result = {
    "benchmark": "device_throughput",
    "argv": sys.argv[1:] if argv is None else argv,
    "smoke": args.smoke,
    "model": "tiny llama" if args.smoke else args.preset,
    "num_params": jax_side["num_params"],
    "batches": source,
    "config": {
      k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "max_length", "shared_prompts")
    },
    "attention": jax_side["attention"],
    "packed_rows": jax_side["rows"],
    "real_tokens": real_tokens,
    "model_flops": model_flops,
    "device_kind": jax_side["device_kind"],
    "num_devices": jax_side["num_devices"],
    "peak_flops": peak,
    "jax_init_s": round(jax_side["init_s"], 2),
    "jax_compile_s": round(jax_side["compile_s"], 2),
    "sides": sides,
    "torch": torch_note,
    "machine": platform.platform(),
  }
  if "PyTorch" in sides:
    result["ratio_tokens_per_s"] = round(
      sides["jaxpref"]["real_tokens_per_s"] / sides["PyTorch"]["real_tokens_per_s"], 3
    )
  print(
    f"{result['model']} ({result['num_params'] / 1e6:,.1f}M params) on "
    f"{result['num_devices']} x {result['device_kind']}, "
    f"attention {result['attention']}, {source} batches of {args.batch_size} pairs, "
    f"packed {jax_side['rows'][0]} x {jax_side['rows'][1]}; PyTorch: {torch_note}"
  )
  print(
    f"{'side':<8} {'median step s':>14} {'real tok/s':>11} {'real frac':>9} {'TFLOP/s':>8} "
    f"{'MFU':>7} {'loss first->last':>20}"
  )
  for name, row in sides.items():
    mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
    print(
      f"{name:<8} {row['median_step_s']:>14.4f} {row['real_tokens_per_s']:>11.1f} "
      f"{row['real_token_fraction']:>9.3f} {row['model_tflops_per_s']:>8.3f} {mfu:>7} "
      f"{row['first_loss']:>9.4f}->{row['last_loss']:<9.4f}"
    )
  print(f"jaxpref init {result['jax_init_s']} s, compile {result['jax_compile_s']} s")
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
