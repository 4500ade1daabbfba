"""Positions that packing and shared prompts save on each shared data file (no model is run).

For every preference file under `../shared/data/preferences`, tokenised with the GPT-2 tokenizer
as training does (`auto` special tokens, left truncation at `--max_length`), counts the positions
a step computes per item: padded (each response padded to the batch's bucket, as with
`data.packing=False`), packed (real tokens, rows of `max_length`), and packed with shared prompts
(each item's common prefix once), over the batches of `jaxpref.data.packing` with the global
batch size given. Prints a table and, with `--json OUT`, writes it.

  .venv/bin/python benchmarks/shared_prompts.py --json /tmp/shared_prompts.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from jaxpref.data import TokenizeOptions, load_tokenizer, packing, read_preferences, shared
from jaxpref.data import tokenize as tokenize_lib

SHARED = shared.shared_dir()
FILES = {  # name -> (file, read options)
  "helpful": ("helpful.json", {}),
  "harmless": ("harmless.json", {}),
  "hh-rlhf harmless (raw)": ("hh-rlhf/harmless-base-test.jsonl.gz", {"task": "harmless"}),
  "webgpt": ("webgpt.json", {"on_tie": "skip"}),
  "domain_specific": ("domain_specific.json", {"on_error": "skip"}),
}


def _groups(tok) -> list[list[np.ndarray]]:
  return [
    [
      tok.token_ids[tok.starts_r[r] : tok.starts_r[r] + tok.lengths_r[r]]
      for r in range(tok.item_starts[i], tok.item_starts[i + 1])
    ]
    for i in range(len(tok))
  ]


def measure(groups: list[list[np.ndarray]], max_length: int, batch_size: int) -> dict:
  buckets = tokenize_lib.length_buckets(max_length, 32)
  padded = real = shared_real = rows = shared_rows = 0
  for start in range(0, len(groups), batch_size):
    batch = groups[start : start + batch_size]
    n = max(len(g) for g in batch)
    longest = max(len(s) for g in batch for s in g)
    padded += len(batch) * n * tokenize_lib.bucket_length(longest, buckets)
    real += sum(len(s) for g in batch for s in g)
    for share in (False, True):
      packed = packing.pack_groups(batch, row_length=max_length, share_prompts=share)
      if share:
        shared_real += int((packed.segment_ids > 0).sum())
        shared_rows += packed.input_ids.shape[0]
      else:
        rows += packed.input_ids.shape[0]
  return {
    "items": len(groups),
    "responses": sum(len(g) for g in groups),
    "padded_positions": padded,
    "real_tokens": real,
    "shared_tokens": shared_real,
    "packed_positions": rows * max_length,
    "shared_packed_positions": shared_rows * max_length,
    "saved_by_sharing": round(1 - shared_real / real, 4),
    "shared_packed_vs_padded": round(shared_rows * max_length / padded, 4),
    "packed_vs_padded": round(rows * max_length / padded, 4),
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max_length", type=int, default=512)
  parser.add_argument("--global_batch_size", type=int, default=16)
  parser.add_argument("--smoke", action="store_true", help="100 items per file")
  parser.add_argument("--json", type=Path, default=None, help="write the results here")
  args = parser.parse_args(argv)
  prefs = SHARED / "data" / "preferences"
  tokenizer_file = SHARED / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
  if not prefs.is_dir() or not tokenizer_file.is_file():
    sys.exit(f"shared data not found under {SHARED} (set JAXPREF_SHARED)")
  tokenizer = load_tokenizer(tokenizer_file)
  options = TokenizeOptions(max_length=args.max_length)
  results = {}
  for name, (file, read_options) in FILES.items():
    items, _ = read_preferences(prefs / file, **read_options)
    items = items[:100] if args.smoke else items
    tok = tokenize_lib.tokenize_items(items, tokenizer, options, task=name)
    results[name] = measure(_groups(tok), args.max_length, args.global_batch_size)
  width = max(len(k) for k in results)
  header = (
    f"{'file':<{width}}  {'items':>6}  {'real tok':>9}  {'shared tok':>10}  {'saved':>6}"
    f"  {'packed/padded':>13}  {'+shared/padded':>14}"
  )
  print(f"max_length {args.max_length}, batches of {args.global_batch_size} items")
  print(header)
  for name, r in results.items():
    print(
      f"{name:<{width}}  {r['items']:>6}  {r['real_tokens']:>9}  {r['shared_tokens']:>10}"
      f"  {r['saved_by_sharing']:>6.1%}  {r['packed_vs_padded']:>13.3f}"
      f"  {r['shared_packed_vs_padded']:>14.3f}"
    )
  result = {
    "benchmark": "shared_prompts",
    "argv": sys.argv[1:] if argv is None else argv,
    "max_length": args.max_length,
    "global_batch_size": args.global_batch_size,
    "smoke": args.smoke,
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "files": results,
  }
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
