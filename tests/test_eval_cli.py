"""`jaxpref.eval` on a small HF checkpoint reproduces accuracy and ECE computed from transformers'
rewards with the checkpoint's own tokenizer called plainly (an independent numpy computation of
the metrics)."""

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

  torch.manual_seed(0)
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
  report_json = json.loads((out / "report.json").read_text())
  report, report_run = report_json["helpful_small"], report_json["run"]

  # transformers' rewards with the checkpoint's own tokenizer called plainly (no jaxpref code).
  items, _ = reader.read_preferences(data, task="helpful_small")
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  with torch.no_grad():
    rewards = np.array(
      [
        [
          float(
            model(**hf_tok(t, truncation=True, max_length=64, return_tensors="pt")).logits[0, 0]
          )
          for t in item.texts
        ]
        for item in items
      ]
    )
  scores = np.array([item.scores for item in items])
  assert sum(len(hf_tok(t)["input_ids"]) > 64 for item in items for t in item.texts) > 40
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
  assert report_run["contract"]["truncation_side"] == "right"  # what transformers does
  assert report_run["contract"]["max_length"] == 64  # --max_length overrides the contract
  assert (out / "reliability_helpful_small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "helpful_small" in (out / "report.md").read_text()
