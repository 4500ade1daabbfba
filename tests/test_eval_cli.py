"""`jaxpref.eval` on a small HF checkpoint reproduces accuracy and ECE computed from transformers'
rewards on the same token ids (an independent numpy computation of the metrics)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import train_helpers as th

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _paper_ece(probs, labels, n_bins):
  edges = np.linspace(0, 1, n_bins + 1)
  ids = np.searchsorted(edges[1:-1], probs)
  return sum(abs(probs[ids == b].sum() - labels[ids == b].sum()) for b in range(n_bins)) / len(
    probs
  )


@pytest.mark.parity
def test_eval_cli_matches_transformers(tmp_path, gpt2_tokenizer_file, preferences_dir):
  from jaxpref.data import reader
  from jaxpref.data.tokenize import load_tokenizer
  from jaxpref.evaluation.evaluator import tokenized_eval_batches

  torch.manual_seed(0)
  # pad_token_id differs from EOS (50256): see the comment below.
  config = transformers.GPTNeoXConfig(
    vocab_size=50304,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    rotary_pct=0.25,
    num_labels=1,
    pad_token_id=50300,
    initializer_range=0.2,
  )
  model = transformers.GPTNeoXForSequenceClassification(config).eval()
  hf_dir = tmp_path / "hf"
  model.save_pretrained(hf_dir)
  tokenizer = load_tokenizer(gpt2_tokenizer_file)
  tokenizer.save_pretrained(hf_dir)

  data = tmp_path / "helpful_small.jsonl"
  rows = json.loads((preferences_dir / "helpful.json").read_text())[:40]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "eval"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxpref.eval",
      f"--model={hf_dir}",
      f"--data={data}",
      f"--output={out}",
      "--max_length=64",
      "--n_bootstrap=0",
      "--batch_size=8",
    ],
    env=th.env_with(),
    cwd=th.REPO,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())["helpful_small"]

  # transformers' rewards on the same token ids (positions from the mask, as jaxpref uses).
  items, _ = reader.read_preferences(data, task="helpful_small")
  rewards, scores = [], []
  for batch in tokenized_eval_batches(items, load_tokenizer(hf_dir), batch_size=8, max_length=64):
    b, n, length = batch["input_ids"].shape
    ids = torch.tensor(batch["input_ids"].reshape(b * n, length), dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"].reshape(b * n, length), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # HF pools the last token that is not pad_token_id; texts end with EOS, so padding must use
    # another id for HF to pool the same (last real) token as jaxpref, which uses the mask.
    ids[mask == 0] = 50300
    with torch.no_grad():
      logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    valid = batch["valid_b"]
    rewards.append(logits[:, 0].numpy().reshape(b, n)[valid])
    scores.append(batch["scores"][valid])
  rewards, scores = np.concatenate(rewards), np.concatenate(scores)
  diff = rewards[:, 0] - rewards[:, 1]
  better_first = scores[:, 0] > scores[:, 1]
  margin = np.where(better_first, diff, -diff)
  accuracy = float(np.mean(margin > 0))
  probs = 1 / (1 + np.exp(-np.concatenate([diff, -diff])))
  labels = np.concatenate([better_first, ~better_first]).astype(np.float64)
  assert report["n_pairs"] == len(rows)
  assert report["accuracy"] == pytest.approx(accuracy, abs=1e-6)
  for n_bins in (5, 10, 20):
    assert report[f"ece_{n_bins}"] == pytest.approx(_paper_ece(probs, labels, n_bins), abs=1e-4)
  assert (out / "reliability_helpful_small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "helpful_small" in (out / "report.md").read_text()
