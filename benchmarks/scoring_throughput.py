"""Scoring throughput: jaxpref's `Scorer` vs transformers' sequence classifier, pairs per second.

Both score the same token ids (helpful pairs from the shared data, GPT-2 tokenizer, left
truncation to `--max_length` with EOS appended, as jaxpref tokenises) with the same random
GPT-NeoX reward model (created in transformers, loaded by jaxpref with `hf_io.load_hf`).
jaxpref packs each pair (its prompt once, `data.shared_prompts`; jitted once per row shape);
transformers runs under `torch.no_grad()` padding each batch to its longest row, in input order
(the usual loop) and, for reference, sorted by length. Each side scores everything once untimed
(jaxpref compiles then; reported) and once timed. The largest reward difference between the two is
reported as a check that both computed the same thing.

`--best_of_n 4,8,16`: best-of-n scoring instead, n responses to each of `--prompts` helpful
prompts (the conversation before the last assistant turn, with that item's two responses and
n - 2 responses of other items). jaxpref's `Scorer` gets each prompt's n texts as a group
(`group_sizes`: packed, the shared prompt computed once); also timed with `packing=False`;
transformers scores each prompt's n responses in batches of `--batch_size` sequences, padded to
the longest (the usual loop).

  .venv/bin/python benchmarks/scoring_throughput.py --json /tmp/scoring_throughput.json
  .venv/bin/python benchmarks/scoring_throughput.py --best_of_n 4,8,16 --json /tmp/best_of_n.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as shared_setup  # noqa: E402 - the sibling benchmark's model and data.


def token_ids(pairs: int, max_length: int) -> list[list[int]]:
  """2 * pairs token sequences (chosen, rejected, ...) from the helpful file."""
  from jaxpref.data import load_tokenizer, read_preferences

  items, _ = read_preferences(shared_setup.SHARED / "data" / "preferences" / "helpful.json")
  tokenizer = load_tokenizer(shared_setup.TOKENIZER_FILE)
  texts = [t for item in items[:pairs] for t in item.texts]
  encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
  eos = tokenizer.eos_token_id
  return [list(ids)[-(max_length - 1) :] + [eos] for ids in encoded]


ASSISTANT = "\n\nAssistant:"


def best_of_n_ids(prompts: int, n: int, max_length: int) -> list[list[int]]:
  """`prompts` groups of n token sequences: a helpful prompt and n responses (see module doc)."""
  from jaxpref.data import load_tokenizer, read_preferences

  items, _ = read_preferences(shared_setup.SHARED / "data" / "preferences" / "helpful.json")
  tokenizer = load_tokenizer(shared_setup.TOKENIZER_FILE)
  split = []
  for item in items:
    cut = item.texts[0].rfind(ASSISTANT) + len(ASSISTANT)
    if cut >= len(ASSISTANT) and all(t[:cut] == item.texts[0][:cut] for t in item.texts):
      split.append((item.texts[0][:cut], [t[cut:] for t in item.texts]))
  texts = []
  for p, (prompt, own) in enumerate(split[:prompts]):
    others = [r for _, rs in split[prompts + p * n :] for r in rs][: n - len(own)]
    texts += [prompt + r for r in (own + others)[:n]]
  encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
  eos = tokenizer.eos_token_id
  return [list(ids)[-(max_length - 1) :] + [eos] for ids in encoded]


def score_hf(model, sequences, batch_size: int, sort: bool) -> np.ndarray:
  import torch

  order = (
    np.argsort([len(s) for s in sequences], kind="stable") if sort else np.arange(len(sequences))
  )
  rewards = np.zeros(len(sequences), np.float32)
  with torch.no_grad():
    for start in range(0, len(order), batch_size):
      index = order[start : start + batch_size]
      longest = max(len(sequences[i]) for i in index)
      ids = torch.full((len(index), longest), shared_setup.PAD_ID, dtype=torch.long)
      mask = torch.zeros((len(index), longest), dtype=torch.long)
      for row, i in enumerate(index):
        ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
        mask[row, : len(sequences[i])] = 1
      rewards[index] = model(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
  return rewards


def load_models(args):
  """The same random GPT-NeoX RM for both sides: jaxpref's (cfg, params on device) and
  transformers' model in eval mode."""
  import jax
  import torch
  import transformers

  from jaxpref.models import hf_io

  with tempfile.TemporaryDirectory() as tmp:
    checkpoint = shared_setup.make_checkpoint(
      Path(tmp) / "checkpoint", args.hidden, args.layers, args.max_length
    )
    cfg, params = hf_io.load_hf(checkpoint)
    model = transformers.GPTNeoXForSequenceClassification.from_pretrained(
      checkpoint, torch_dtype=torch.float32
    ).eval()
  return cfg, jax.device_put(params), model


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=256, help="helpful pairs to score")
  parser.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass")
  parser.add_argument("--max_length", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--best_of_n", default="", help="comma-separated n: best-of-n mode")
  parser.add_argument("--prompts", type=int, default=32, help="best-of-n prompts per n")
  parser.add_argument("--smoke", action="store_true", help="tiny model, 16 pairs (CI)")
  parser.add_argument("--json", type=Path, default=None, help="also write the results here")
  args = parser.parse_args(argv)
  if not shared_setup.TOKENIZER_FILE.is_file():
    sys.exit(f"shared data not found under {shared_setup.SHARED} (set JAXPREF_SHARED)")
  if args.smoke:
    args.pairs, args.batch_size, args.max_length, args.hidden, args.layers = 16, 8, 64, 32, 1
    args.prompts = 4
  if args.best_of_n:
    return best_of_n_main(args, argv)

  import jax
  import torch

  from jaxpref.evaluation.scoring import Scorer

  sequences = token_ids(args.pairs, args.max_length)
  cfg, params, model = load_models(args)
  scorer = Scorer(
    cfg,
    jax.device_put(params),
    batch_size=args.batch_size,
    max_length=args.max_length,
    pad_token_id=shared_setup.PAD_ID,
  )

  pairs = [2] * (len(sequences) // 2)  # chosen and rejected share their prompt
  _, jax_first_s = timed(lambda: scorer.score_token_ids(sequences, group_sizes=pairs))
  jax_rewards, jax_s = timed(lambda: scorer.score_token_ids(sequences, group_sizes=pairs))
  rows = {"jaxpref Scorer (packed, shared prompts)": jax_s}
  for sort in (False, True):
    score_hf(model, sequences[: 2 * args.batch_size], args.batch_size, sort)  # Warm-up.
    hf_rewards, seconds = timed(lambda sort=sort: score_hf(model, sequences, args.batch_size, sort))
    rows[f"transformers ({'sorted' if sort else 'input order'}, pad longest)"] = seconds
  real_tokens = sum(len(s) for s in sequences)
  table = [
    {
      "scorer": name,
      "seconds": round(s, 3),
      "pairs_per_s": round(args.pairs / s, 2),
      "real_tokens_per_s": round(real_tokens / s, 1),
    }
    for name, s in rows.items()
  ]
  baseline = table[1]["pairs_per_s"]
  result = {
    "benchmark": "scoring_throughput",
    "argv": sys.argv[1:] if argv is None else argv,
    "smoke": args.smoke,
    "config": {
      k: getattr(args, k) for k in ("pairs", "batch_size", "max_length", "hidden", "layers")
    },
    "real_tokens": real_tokens,
    "jax_first_pass_s": round(jax_first_s, 3),
    "rows": table,
    "ratio_vs_transformers_input_order": round(table[0]["pairs_per_s"] / baseline, 3),
    "ratio_vs_transformers_sorted": round(table[0]["pairs_per_s"] / table[2]["pairs_per_s"], 3),
    "max_abs_reward_diff": float(np.max(np.abs(jax_rewards - hf_rewards))),
    "torch_threads": torch.get_num_threads(),
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
  }
  width = max(len(r["scorer"]) for r in table)
  print(f"{'scorer':<{width}}  {'seconds':>8}  {'pairs/s':>8}  {'real tok/s':>10}")
  for r in table:
    print(
      f"{r['scorer']:<{width}}  {r['seconds']:>8.3f}  {r['pairs_per_s']:>8.2f}  "
      f"{r['real_tokens_per_s']:>10.1f}"
    )
  print(
    f"ratio jaxpref/transformers: {result['ratio_vs_transformers_input_order']}x (input order),"
    f" {result['ratio_vs_transformers_sorted']}x (sorted); jaxpref first pass (compiles) "
    f"{result['jax_first_pass_s']} s; max |reward diff| {result['max_abs_reward_diff']:.2e}"
  )
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return result


def best_of_n_main(args, argv) -> dict:
  import torch

  from jaxpref.evaluation.scoring import Scorer

  cfg, params, model = load_models(args)
  kwargs = dict(batch_size=args.batch_size, max_length=args.max_length)
  scorers = {
    "jaxpref Scorer (packed, shared prompts)": Scorer(cfg, params, **kwargs),
    "jaxpref Scorer (padded, sorted, buckets)": Scorer(cfg, params, packing=False, **kwargs),
  }
  table = []
  for n in [int(x) for x in args.best_of_n.split(",")]:
    sequences = best_of_n_ids(args.prompts, n, args.max_length)
    groups = [n] * (len(sequences) // n)
    rows, rewards = {}, {}
    for name, scorer in scorers.items():
      scorer.score_token_ids(sequences, group_sizes=groups)  # Compiles.
      rewards[name], rows[name] = timed(
        lambda s=scorer, q=sequences, g=groups: s.score_token_ids(q, group_sizes=g)
      )
    score_hf(model, sequences[: args.batch_size], args.batch_size, False)  # Warm-up.
    hf_rewards, rows["transformers (per prompt, pad longest)"] = timed(
      lambda q=sequences: score_hf(model, q, args.batch_size, False)
    )
    hf_s = rows["transformers (per prompt, pad longest)"]
    for name, seconds in rows.items():
      diff = float(np.max(np.abs(rewards.get(name, hf_rewards) - hf_rewards)))
      table.append(
        {
          "n": n,
          "scorer": name,
          "seconds": round(seconds, 3),
          "responses_per_s": round(len(sequences) / seconds, 2),
          "vs_transformers": round(hf_s / seconds, 3),
          "max_abs_reward_diff": diff,
        }
      )
  result = {
    "benchmark": "scoring_throughput_best_of_n",
    "argv": sys.argv[1:] if argv is None else argv,
    "smoke": args.smoke,
    "config": {
      k: getattr(args, k)
      for k in ("prompts", "best_of_n", "batch_size", "max_length", "hidden", "layers")
    },
    "rows": table,
    "torch_threads": torch.get_num_threads(),
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
  }
  width = max(len(r["scorer"]) for r in table)
  print(f"{'n':>3}  {'scorer':<{width}}  {'seconds':>8}  {'resp/s':>8}  {'x transformers':>14}")
  for r in table:
    print(
      f"{r['n']:>3}  {r['scorer']:<{width}}  {r['seconds']:>8.3f}  {r['responses_per_s']:>8.2f}"
      f"  {r['vs_transformers']:>14.2f}  (max |reward diff| {r['max_abs_reward_diff']:.1e})"
    )
  if args.json:
    args.json.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
