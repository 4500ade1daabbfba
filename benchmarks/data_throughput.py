"""Data-pipeline throughput on the shared preference files: read, tokenise, batch.

Prints a table (items/s per stage) and, with `--json OUT`, writes the numbers. `--smoke` uses
200 items per task and a few steps (seconds). Needs `../shared/data` (the GPT-2 tokenizer and
the preference files).

  .venv/bin/python benchmarks/data_throughput.py --json /tmp/data_throughput.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from jaxpref.data import (
  TokenizeOptions,
  build_eval_batches,
  build_train_pipeline,
  load_tokenizer,
  read_preferences,
  shared,
  tokenize_items,
)

SHARED = shared.shared_dir()
FILES = {  # task -> (file, read options)
  "helpful": ("helpful.json", {}),
  "harmless": ("hh-rlhf/harmless-base-test.jsonl.gz", {"task": "harmless"}),
  "webgpt": ("webgpt.json", {"on_tie": "skip"}),
  "dsp": ("domain_specific.json", {"on_error": "skip", "domains": ["academy"]}),
}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max_length", type=int, default=512)
  parser.add_argument("--global_batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=200, help="training batches to time")
  parser.add_argument("--num_threads", type=int, default=2)
  parser.add_argument("--smoke", action="store_true", help="200 items per task, 10 steps")
  parser.add_argument("--json", type=Path, default=None, help="write the results here")
  args = parser.parse_args(argv)
  prefs = SHARED / "data" / "preferences"
  tokenizer_file = SHARED / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
  if not prefs.is_dir() or not tokenizer_file.is_file():
    sys.exit(f"shared data not found under {SHARED} (set JAXPREF_SHARED)")
  limit = 200 if args.smoke else None
  steps = 10 if args.smoke else args.steps
  rows = []

  def record(stage: str, items: int, seconds: float, **extra) -> None:
    rows.append(
      {
        "stage": stage,
        "items": items,
        "seconds": round(seconds, 4),
        "items_per_s": round(items / seconds, 1) if seconds else None,
        **extra,
      }
    )

  tasks, records = {}, 0
  t0 = time.perf_counter()
  for name, (file, options) in FILES.items():
    items, summary = read_preferences(prefs / file, **options)
    tasks[name] = items[:limit]
    records += summary.read
  record("read + validate (all records)", records, time.perf_counter() - t0)

  tokenizer = load_tokenizer(tokenizer_file)
  options = TokenizeOptions(max_length=args.max_length)
  t0 = time.perf_counter()
  tokenized = {
    name: tokenize_items(items, tokenizer, options, task=name) for name, items in tasks.items()
  }
  n_items = sum(len(v) for v in tasks.values())
  truncated = sum(t.num_truncated for t in tokenized.values())
  record(
    "tokenise (GPT-2, 2 responses/item)", n_items, time.perf_counter() - t0, truncated=truncated
  )

  it = build_train_pipeline(
    tokenized,
    None,
    global_batch_size=args.global_batch_size,
    max_length=args.max_length,
    num_steps=steps,
    num_threads=args.num_threads,
  )
  lengths, real, total = collections.Counter(), 0, 0
  t0 = time.perf_counter()
  for batch in it:
    lengths[batch.input_ids.shape[-1]] += 1
    real += int(batch.attention_mask.sum())
    total += batch.attention_mask.size
  record(
    "train batches (resample, grain)",
    steps * args.global_batch_size,
    time.perf_counter() - t0,
    real_token_fraction=round(real / total, 3),
    batch_lengths=dict(sorted(lengths.items())),
  )

  eval_items = tasks["helpful"]
  t0 = time.perf_counter()
  batches = build_eval_batches(
    eval_items, tokenizer, batch_size=args.global_batch_size, max_length=args.max_length
  )
  for _ in batches:
    pass
  record("eval batches (tokenise + batch)", len(eval_items), time.perf_counter() - t0)

  result = {
    "benchmark": "data_throughput",
    "argv": sys.argv[1:] if argv is None else argv,
    "smoke": args.smoke,
    "max_length": args.max_length,
    "global_batch_size": args.global_batch_size,
    "items_per_task": {k: len(v) for k, v in tasks.items()},
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "rows": rows,
  }
  width = max(len(r["stage"]) for r in rows)
  print(f"{'stage':<{width}}  {'items':>7}  {'seconds':>8}  {'items/s':>9}")
  for r in rows:
    print(f"{r['stage']:<{width}}  {r['items']:>7}  {r['seconds']:>8.3f}  {r['items_per_s']:>9.1f}")
  train = rows[2]
  print(
    f"train batches: real-token fraction {train['real_token_fraction']}, "
    f"lengths {train['batch_lengths']}; truncated items {rows[1]['truncated']} of {n_items}"
  )
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  np.set_printoptions(linewidth=120)
  main()
