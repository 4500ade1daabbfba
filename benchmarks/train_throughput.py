"""Training throughput: jaxpref's jitted train step vs a plain PyTorch loop on the same model.

Both sides train the same Pythia-shaped (GPT-NeoX) reward model from identical weights: a random
`GPTNeoXForSequenceClassification` is created once in transformers (torch seed), saved with
`save_pretrained` and loaded by jaxpref with `jaxpref.models.hf_io.load_hf`. Both see the same
batches, built by jaxpref's training pipeline from the shared helpful / harmless data (length
buckets, right padding). jaxpref trains on the bucketed batch as is; the PyTorch loop re-pads
every batch to its longest real row (what a `DataCollatorWithPadding` loop does). Both use fp32,
AdamW (same hyperparameters) and the loss `-logsigmoid(r_chosen - r_rejected)`, mean over pairs.

Each side runs in its own subprocess so that its peak RSS (`resource.getrusage`) is its own.
Warm-up steps (jaxpref: one per distinct bucket, so all compilation is excluded and reported
separately) are not timed. Throughput counts real (non-pad) tokens only.

The sides run alternately `--rounds` times and each side's fastest round is reported (all rounds
are in the JSON, with the load average): on a shared machine other processes slow both sides, and
PyTorch's spinning OpenMP threads far more than XLA's (a load of ~3 on 2 cores made the PyTorch
loop 5x slower and jaxpref 1.7x), so single runs under load overstate jaxpref's lead.

  .venv/bin/python benchmarks/train_throughput.py --json /tmp/train_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxpref.data import shared

SHARED = shared.shared_dir()
TOKENIZER_FILE = SHARED / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
FILES = {  # task -> (file under data/preferences, read options)
  "helpful": ("helpful.json", {}),
  "harmless": ("hh-rlhf/harmless-base-test.jsonl.gz", {"task": "harmless"}),
}
PAD_ID = 50257  # Outside GPT-2's ids: the tokenizer appends EOS (50256), and HF pools the last
# token that is not `pad_token_id`, so the pad id must never be a real token.
LEARNING_RATE, WEIGHT_DECAY, GRAD_CLIP = 1e-5, 0.01, 1.0


def peak_rss_mib() -> float:
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(directory: Path, hidden: int, layers: int, max_length: int, seed: int = 0):
  """A random GPT-NeoX reward model saved in the Hugging Face format (the shared weights)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.GPTNeoXConfig(
    vocab_size=50304,  # Pythia's padded GPT-NeoX vocabulary; GPT-2 ids fit in it.
    hidden_size=hidden,
    num_hidden_layers=layers,
    num_attention_heads=max(hidden // 32, 1),
    intermediate_size=4 * hidden,
    max_position_embeddings=max(max_length, 2048),
    rotary_pct=0.25,
    num_labels=1,
    pad_token_id=PAD_ID,
    eos_token_id=PAD_ID,
  )
  model = transformers.GPTNeoXForSequenceClassification(config)
  model.save_pretrained(directory)
  return directory


def make_batches(
  path: Path, steps: int, batch_size: int, max_length: int, limit: int | None, multiple: int
):
  """`steps` jaxpref pipeline batches from helpful + harmless, saved to one .npz."""
  from jaxpref.data import build_train_pipeline, length_buckets, load_tokenizer, read_preferences

  prefs = SHARED / "data" / "preferences"
  tasks = {}
  for name, (file, options) in FILES.items():
    items, _ = read_preferences(prefs / file, **options)
    tasks[name] = items[:limit]
  tokenizer = load_tokenizer(TOKENIZER_FILE)
  it = build_train_pipeline(
    tasks,
    tokenizer,
    global_batch_size=batch_size,
    max_length=max_length,
    num_steps=steps,
    seed=0,
    buckets=length_buckets(max_length, 32, multiple),
  )
  arrays = {}
  for i, batch in enumerate(it):
    for key, value in dataclasses.asdict(batch).items():
      arrays[f"{i}/{key}"] = value
  np.savez(path, **arrays)


def load_batches(path: Path) -> list[dict[str, np.ndarray]]:
  data = np.load(path)
  steps = sorted({int(k.split("/")[0]) for k in data.files})
  keys = ("input_ids", "attention_mask", "scores", "task_ids")
  return [{k: data[f"{i}/{k}"] for k in keys} for i in steps]


def run_jax(
  checkpoint: Path,
  batches,
  warmup: int,
  attention: str,
  max_length: int,
  packing: bool,
  share_prompts: bool = False,
) -> dict:
  """Times the trainer's own step (`jaxpref.training.step.build_from_config`: ranking loss, the
  trainer's AdamW chain with clipping, mesh shardings and donation), jitted once per batch shape.

  Batches reach the device through the trainer's own path (`jaxpref.training.data.global_batch`).
  With `packing`, each batch is packed on the host inside the timed step (`jaxpref.data.packing`,
  the same rows the pipeline makes with `data.packing=True`, and with `share_prompts` each item's
  common prompt once, as `data.shared_prompts=True`); the trainer packs in the pipeline's
  prefetch threads instead, so this overstates its cost.
  """
  import jax

  from jaxpref import sharding
  from jaxpref.data import packing as packing_lib
  from jaxpref.data.batch import PaddedBatch
  from jaxpref.models import hf_io
  from jaxpref.training import data as train_data
  from jaxpref.training import flops
  from jaxpref.training import step as train_step_lib

  cfg, params = hf_io.load_hf(checkpoint)
  cfg = cfg.replace(attention=attention)
  config = trainer_config(max_length, packing, share_prompts)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  program = train_step_lib.build_from_config(
    config, cfg, num_tasks=2, total_steps=len(batches), mesh=mesh
  )
  state = program.init(jax.random.PRNGKey(0), params)
  step = program.step_fn

  row_multiple = sharding.global_batch_size_multiple(mesh)

  def prepare(batch):
    batch = PaddedBatch.from_dict(batch)
    if packing:
      batch = packing_lib.pack_batch(
        batch, row_length=max_length, row_multiple=row_multiple, share_prompts=share_prompts
      )
    return train_data.global_batch(batch, mesh)

  shape_of = lambda b: b.input_ids.shape
  feed = prepare
  if not packing:  # Padded batches go to the device untimed.
    on_device = {id(b): prepare(b) for b in batches}
    feed = lambda b: on_device[id(b)]
  # Compile every shape the timed batches use, on a copy of the state (so that the updates
  # both sides make before timing are the same `warmup` steps), then warm up.
  t0 = time.perf_counter()
  seen = set()
  for batch in batches:
    batch = feed(batch)
    if shape_of(batch) not in seen:
      seen.add(shape_of(batch))
      jax.block_until_ready(step(jax.tree.map(jax.numpy.copy, state), batch))
  compile_s = time.perf_counter() - t0
  for batch in batches[:warmup]:
    state, metrics = step(state, feed(batch))
  jax.block_until_ready(metrics["loss"])
  times, losses, positions = [], [], 0
  for batch in batches:
    t0 = time.perf_counter()
    state, metrics = step(state, feed(batch))
    losses.append(float(metrics["loss"]))  # Syncs, as a logging loop would.
    times.append(time.perf_counter() - t0)
    positions += int(metrics["positions"])
  lengths = [int(n) for b in batches for n in np.asarray(b["attention_mask"]).sum(-1).ravel()]
  return {
    "step_s": times,
    "losses": losses,
    "compile_s": compile_s,
    "shapes": sorted(seen),
    "positions": positions,
    # Model FLOPs of the timed steps (`jaxpref.training.flops`: real tokens only, causal attention).
    "model_flops": flops.train_flops(cfg, lengths),
    "device_kind": jax.devices()[0].device_kind,
    "peak_flops": flops.peak_flops(jax.devices()[0].device_kind),
  }


def trainer_config(max_length: int, packing: bool, share_prompts: bool = False):
  """The training config both sides follow: constant lr, AdamW, global-norm clipping at 1."""
  from jaxpref.training.config import base_config

  config = base_config()
  config.loss.kind = "ranking"
  config.train.learning_rate = LEARNING_RATE
  config.train.weight_decay = WEIGHT_DECAY
  config.train.schedule = "constant"
  config.train.warmup_steps = 0
  config.train.grad_clip = GRAD_CLIP
  config.data.max_length = max_length
  config.data.packing = packing
  config.data.shared_prompts = share_prompts
  return config


def run_torch(checkpoint: Path, batches, warmup: int) -> dict:
  """Times a plain PyTorch loop: pad to the longest row, forward, loss, backward, AdamW."""
  import torch
  import transformers
  from torch.nn import functional as F

  model = transformers.GPTNeoXForSequenceClassification.from_pretrained(
    checkpoint, torch_dtype=torch.float32
  )
  model.train()
  model.config.pad_token_id = PAD_ID
  # The trainer's optimizer: AdamW (torch's defaults match optax's b1 0.9, b2 0.999, eps 1e-8)
  # with no weight decay on biases and norm scales (1-d parameters), after global-norm clipping.
  matrices = [p for p in model.parameters() if p.ndim > 1]
  vectors = [p for p in model.parameters() if p.ndim <= 1]
  optimizer = torch.optim.AdamW(
    [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": vectors, "weight_decay": 0.0}],
    lr=LEARNING_RATE,
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
    scores = torch.from_numpy(batch["scores"])
    return torch.from_numpy(ids), torch.from_numpy(att), scores

  def step(batch):
    ids, att, scores_bn = to_torch(batch)
    rewards_bn = model(input_ids=ids, attention_mask=att).logits.reshape(scores_bn.shape)
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
    return float(loss)

  # The same untimed updates as the jax side (`warmup` steps), so both sides' timed losses come
  # from identical parameters and can be compared.
  for batch in batches[:warmup]:
    step(batch)
  times, losses = [], []
  for batch in batches:
    t0 = time.perf_counter()
    losses.append(step(batch))
    times.append(time.perf_counter() - t0)
  # Positions computed: every row padded to the longest row of its batch.
  positions = sum(
    int(b["attention_mask"][..., 0].size * b["attention_mask"].sum(-1).max()) for b in batches
  )
  return {
    "step_s": times,
    "losses": losses,
    "positions": positions,
    "torch_threads": torch.get_num_threads(),
  }


SIDES = ("jax_shared", "jax_packed", "jax", "torch")
LABELS = {
  "jax_shared": "jaxpref packed + shared prompts",  # the trainer's default
  "jax_packed": "jaxpref packed",  # data.shared_prompts=False
  "jax": "jaxpref buckets",  # data.packing=False
  "torch": "PyTorch",
}


def _child(args) -> None:
  if args._side == "prep":
    make_checkpoint(args.work / "checkpoint", args.hidden, args.layers, args.max_length)
    make_batches(
      args.work / "batches.npz",
      args.steps,
      args.batch_size,
      args.max_length,
      limit=200 if args.smoke else None,
      multiple=args.bucket_multiple,
    )
    return
  batches = load_batches(args.work / "batches.npz")
  checkpoint = args.work / "checkpoint"
  if args._side == "torch":
    result = run_torch(checkpoint, batches, args.warmup)
  else:
    packed, shared_prompts = args._side != "jax", args._side == "jax_shared"
    result = run_jax(
      checkpoint, batches, args.warmup, args.attention, args.max_length, packed, shared_prompts
    )
  result["peak_rss_mib"] = peak_rss_mib()
  (args.work / f"{args._side}.json").write_text(json.dumps(result))


def summarise(side: dict, batches, model_flops: float, peak_flops: float | None) -> dict:
  real = sum(int(b["attention_mask"].sum()) for b in batches)
  pairs = sum(int((b["attention_mask"].sum(-1) > 0).all(-1).sum()) for b in batches)
  total = sum(float(t) for t in side["step_s"])
  return {
    "median_step_s": round(statistics.median(side["step_s"]), 4),
    "total_s": round(total, 3),
    "pairs_per_s": round(pairs / total, 2),
    "real_tokens_per_s": round(real / total, 1),
    "model_gflops_per_s": round(model_flops / total / 1e9, 2),
    # Only where the device's peak is known (accelerators); the same model FLOPs on every side.
    "mfu": round(model_flops / total / peak_flops, 4) if peak_flops else None,
    "positions": side["positions"],
    "real_token_fraction": round(real / side["positions"], 3),
    "peak_rss_mib": round(side["peak_rss_mib"], 1),
    "first_loss": round(side["losses"][0], 5),
    "last_loss": round(side["losses"][-1], 5),
  }


def result_config(args) -> dict:
  keys = (
    "steps",
    "warmup",
    "batch_size",
    "max_length",
    "hidden",
    "layers",
    "bucket_multiple",
    "attention",
  )
  return {k: getattr(args, k) for k in keys}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
  parser.add_argument("--batch_size", type=int, default=8, help="preference items (pairs) / step")
  parser.add_argument("--max_length", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument(
    "--bucket_multiple",
    type=int,
    default=64,
    help="jaxpref pads batches to multiples of this (data.bucket_multiple); 0 = powers of two",
  )
  parser.add_argument("--attention", default="blocked", choices=("blocked", "dense"))
  parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side")
  parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps (CI)")
  parser.add_argument("--json", type=Path, default=None, help="also write the results here")
  parser.add_argument("--_side", choices=("prep", *SIDES), help=argparse.SUPPRESS)
  parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.smoke and not args._side:
    args.steps, args.warmup, args.batch_size, args.rounds = 3, 1, 4, 1
    args.max_length, args.hidden, args.layers = 64, 32, 1
  if args._side:
    _child(args)
    return {}
  if not TOKENIZER_FILE.is_file():
    sys.exit(f"shared data not found under {SHARED} (set JAXPREF_SHARED)")

  with tempfile.TemporaryDirectory() as tmp:
    work = Path(tmp)
    rounds = {side: [] for side in SIDES}
    # Linux carries a parent's peak RSS into its children (fork keeps it, exec saves it), so this
    # process stays light (numpy only) and even the preparation runs in a subprocess.
    for side in ("prep",) + SIDES * args.rounds:
      cmd = [sys.executable, __file__, "--_side", side, "--work", str(work)]
      for key, value in result_config(args).items():
        cmd += [f"--{key}", str(value)]
      load_before = os.getloadavg()[0]
      proc = subprocess.run(cmd + ["--smoke"] * args.smoke, capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"{side} step failed:\n{proc.stderr[-3000:]}")
      if side != "prep":
        run = json.loads((work / f"{side}.json").read_text())
        run["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        rounds[side].append(run)
    batches = load_batches(work / "batches.npz")
  best = {side: min(runs, key=lambda r: sum(r["step_s"])) for side, runs in rounds.items()}
  model_flops, peak = best["jax"]["model_flops"], best["jax"]["peak_flops"]
  rows = {side: summarise(best[side], batches, model_flops, peak) for side in SIDES}
  torch_rate = rows["torch"]["real_tokens_per_s"]
  result = {
    "benchmark": "train_throughput",
    "argv": sys.argv[1:] if argv is None else argv,
    "smoke": args.smoke,
    "config": result_config(args),
    "real_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
    "sides": {LABELS[side]: rows[side] for side in SIDES},
    "ratio_tokens_per_s": {
      LABELS[side]: round(rows[side]["real_tokens_per_s"] / torch_rate, 3) for side in SIDES
    },
    "jax_compile_s": {LABELS[s]: round(best[s]["compile_s"], 2) for s in SIDES if s != "torch"},
    "jax_shapes": {LABELS[s]: best[s]["shapes"] for s in SIDES if s != "torch"},
    "torch_threads": best["torch"]["torch_threads"],
    "model_flops": model_flops,
    "device_kind": best["jax"]["device_kind"],
    "rounds": {
      LABELS[side]: [
        {"total_s": round(sum(r["step_s"]), 3), "loadavg_1min": r["loadavg_1min"]} for r in runs
      ]
      for side, runs in rounds.items()
    },
    "max_abs_loss_diff_vs_torch": {
      LABELS[side]: round(
        max(abs(a - b) for a, b in zip(best[side]["losses"], best["torch"]["losses"])), 6
      )
      for side in SIDES
      if side != "torch"
    },
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
  }
  print(
    f"{'side':<31} {'median step s':>14} {'real tok/s':>11} {'vs PyTorch':>10} {'real frac':>9} "
    f"{'GFLOP/s':>8} {'MFU':>6} {'peak RSS MiB':>13} {'loss first->last':>20}"
  )
  for side in SIDES:
    row = rows[side]
    print(
      f"{LABELS[side]:<31} {row['median_step_s']:>14.4f} {row['real_tokens_per_s']:>11.1f} "
      f"{row['real_tokens_per_s'] / torch_rate:>9.2f}x {row['real_token_fraction']:>9.3f} "
      f"{row['model_gflops_per_s']:>8.2f} {row['mfu'] if row['mfu'] is not None else '-':>6} "
      f"{row['peak_rss_mib']:>13.1f} {row['first_loss']:>9.4f}->{row['last_loss']:<9.4f}"
    )
  print(f"jaxpref compile s {result['jax_compile_s']}; shapes {result['jax_shapes']}")
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
