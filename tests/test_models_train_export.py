"""Qwen2, Gemma-2 and Qwen3-MoE through the programs: a tiny random transformers checkpoint ->
`python -m jaxpref.train --config.model.path=DIR` -> `python -m jaxpref.export` -> transformers'
`AutoModelForSequenceClassification` gives the rewards jaxpref gives for the trained checkpoint.

Rewards are compared on the same token ids fed to both model APIs (right-padded, pad id never a
real token), so the comparison is of the networks, independent of how text becomes tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import train_helpers as th
from hf_models import VARIANTS, hf_model

# The tiny config's GPT-2 tokenizer needs the vocabulary to cover its 50,257 tokens.
SIZES = dict(vocab_size=50304, hidden_size=32, intermediate_size=48, num_attention_heads=2)
CASES = {
  "qwen2": ("qwen2_sliding", dict(num_key_value_heads=1)),
  "gemma2": ("gemma2", dict(num_key_value_heads=1)),
  "qwen3_moe": ("qwen3_moe", dict(num_key_value_heads=1, moe_intermediate_size=24)),
}


# Slow (about 2 minutes each here): the default run covers train -> export -> transformers with
# GPT-NeoX (tests/test_train.py) and these families' save_hf -> transformers round trip
# (tests/test_models_families.py).
@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("case", ["gemma2", "qwen2", "qwen3_moe"])
def test_train_export_transformers(tmp_path, monkeypatch, case):
  torch = pytest.importorskip("torch")
  import transformers

  from jaxpref.evaluation.scoring import score_fn
  from jaxpref.models.source import load_for_inference

  variant, extra = CASES[case]
  monkeypatch.setitem(
    VARIANTS, "case", (VARIANTS[variant][0], VARIANTS[variant][1] | SIZES | extra)
  )
  base = tmp_path / "base"
  hf_model(torch, "case").save_pretrained(str(base))
  workdir, hf_dir = tmp_path / "run", tmp_path / "hf"
  th.run_train(workdir, f"--config.model.path={base}", "--config.train.steps=2")
  th.run_export(workdir, hf_dir)
  cfg, params, _, step = load_for_inference(workdir=str(workdir))
  assert step == 2 and cfg.arch == case
  rng = np.random.default_rng(0)
  lengths = np.array([12, 5, 9])
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask > 0, rng.integers(1, 50000, mask.shape), 0)
  ids = np.where((ids == cfg.pad_token_id) & (mask > 0), 7, ids)
  ours, _ = score_fn(cfg, params, jnp.asarray(ids[:, None], jnp.int32), jnp.asarray(mask[:, None]))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
  # transformers pools the last token that is not the export's pad id (the run's, e.g. an added
  # `<|pad|>`, not necessarily the base checkpoint's), so pad with that id.
  ids = np.where(mask > 0, ids, model.config.pad_token_id)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0]
  np.testing.assert_allclose(np.asarray(ours)[:, 0], theirs.numpy(), atol=1e-4)
  # Training moved the weights away from the base checkpoint's.
  base_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(base)).eval()
  with torch.no_grad():
    before = base_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  assert not np.allclose(before[:, 0].numpy(), theirs.numpy(), atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_training_reads_half_the_checkpoint_each(tmp_path, monkeypatch):
  """`jaxpref.train` on 2 processes (fsdp=2) from a checkpoint: each reads its half only."""
  import re

  torch = pytest.importorskip("torch")
  import transformers

  monkeypatch.setitem(VARIANTS, "case", ("Gemma2Config", VARIANTS["gemma2"][1] | SIZES))
  base = tmp_path / "base"
  hf_model(torch, "case").save_pretrained(str(base))
  size = (base / "model.safetensors").stat().st_size
  workdir, hf_dir = tmp_path / "run", tmp_path / "hf"
  results = th.run_train_multiprocess(
    workdir,
    f"--config.model.path={base}",
    "--config.train.steps=2",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=2",
  )
  for result in results:
    read = [int(n) for n in re.findall(r"read (\d+) bytes of tensor data", result.stderr)]
    assert read and 0.4 * size < read[0] < 0.6 * size, (read, size)
  th.run_export(workdir, hf_dir)
  from jaxpref.evaluation.scoring import score_fn
  from jaxpref.models.source import load_for_inference

  cfg, params, _, _ = load_for_inference(workdir=str(workdir))
  ids = np.array([[5, 17, 300, 4000, 9, 77]])
  ours, _ = score_fn(cfg, params, jnp.asarray(ids[:, None], jnp.int32), jnp.ones((1, 1, 6), int))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids)).logits[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(ours)[:, 0], theirs, atol=1e-4)
