"""End-to-end training: train -> checkpoint -> resume -> export -> score, preemption and NaN stops.

Subprocess runs use `python -m jaxpref.train` exactly as a user would; in-process runs call
`trainer.train_and_evaluate` (what a notebook does).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_helpers as th

pytestmark = pytest.mark.usefixtures("shared_dir")


def _tiny_config(**changes):
  return th.tiny_config(**changes)


def test_train_resume_export_score(tmp_path):
  workdir = tmp_path / "run"
  first = th.run_train(workdir)
  losses = th.losses_by_step(workdir)
  assert sorted(losses) == [1, 2, 3, 4]
  assert all(np.isfinite(v[0]) for v in losses.values())
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "loss" in r]
  for key in (
    "accuracy",
    "grad_norm",
    "learning_rate",
    "tokens_per_s",
    "step_time_s",
    "task_weight/helpful",
    "task_loss/webgpt",
  ):
    assert key in train_records[-1], key
  assert any("eval/helpful/ece_10" in r for r in records)
  assert (workdir / "config.json").is_file() and (workdir / "model_config.json").is_file()
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    2,
    4,
  ]
  assert "Resuming" not in first.stderr

  # Longer run, same workdir: resumes from step 4 and goes on to 6.
  second = th.run_train(workdir, "--config.train.steps=6")
  assert "Resuming from the checkpoint of step 4" in second.stderr
  assert sorted(th.losses_by_step(workdir)) == [1, 2, 3, 4, 5, 6]

  # Export to Hugging Face and score with it through the CLI.
  hf_dir = tmp_path / "hf"
  th.run_export(workdir, hf_dir)
  assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
  data = tmp_path / "in.jsonl"
  data.write_text(
    json.dumps({"text": "Human: hi\n\nAssistant: hello"})
    + "\n"
    + json.dumps({"prompt": "Human: 2+2?\n\nAssistant:", "responses": [" 4", " 5", " four"]})
    + "\n"
  )
  out = tmp_path / "out.jsonl"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxpref.score",
      f"--model={hf_dir}",
      f"--data={data}",
      f"--output={out}",
      "--max_length=64",
    ],
    env=th.env_with(),
    cwd=th.REPO,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert isinstance(rows[0]["reward"], float)
  assert len(rows[1]["rewards"]) == 3
  assert rows[1]["best_index"] == int(np.argmax(rows[1]["rewards"]))

  # The exported model gives transformers the same rewards as jaxpref's checkpoint.
  torch = pytest.importorskip("torch")
  import transformers

  from jaxpref.data.tokenize import load_tokenizer
  from jaxpref.evaluation.scoring import score_fn
  from jaxpref.models.source import load_for_inference

  cfg, params, tokenizer_path, _ = load_for_inference(workdir=str(workdir))
  tokenizer = load_tokenizer(tokenizer_path)
  texts = ["Human: hi\n\nAssistant: hello there", "Human: why?\n\nAssistant: because"]
  enc = tokenizer(texts, padding=True, return_tensors="np")
  ours, _ = score_fn(cfg, params, enc["input_ids"], enc["attention_mask"])
  model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    theirs = (
      model(
        input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"])
      )
      .logits[:, 0]
      .numpy()
    )
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)

  # `jaxpref.score` packs the best-of-n record (its prompt once): transformers, scoring each
  # response whole with the exported tokenizer, agrees.
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  bon = [f"Human: 2+2?\n\nAssistant:{r}" for r in (" 4", " 5", " four")]
  enc = hf_tokenizer(bon, truncation=True, max_length=64, padding=True, return_tensors="pt")
  with torch.no_grad():
    theirs = model(**enc).logits[:, 0].numpy()
  np.testing.assert_allclose(rows[1]["rewards"], theirs, atol=1e-4)


def test_kill_9_and_restart_matches_uninterrupted(tmp_path):
  overrides = ("--config.train.steps=8", "--config.checkpoint.every_steps=2")
  reference = tmp_path / "reference"
  th.run_train(reference, *overrides)

  killed = tmp_path / "killed"
  proc = subprocess.Popen(
    th.train_command(killed, *overrides),
    env=th.env_with(),
    cwd=th.REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  th.wait_for_step(killed, 5, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  th.run_train(killed, *overrides)

  expected = {step: v[0] for step, v in th.losses_by_step(reference).items()}
  got = th.losses_by_step(killed)
  assert sorted(got) == sorted(expected) == list(range(1, 9))
  for step, values in got.items():
    for value in values:  # Steps logged before the kill and again after the restart.
      assert value == expected[step], (step, value, expected[step])

  from jaxpref.models import reward_model
  from jaxpref.training import workdir as workdir_lib

  cfg = workdir_lib.read_model_config(reference)
  abstract = reward_model.abstract_params(cfg)
  _, params_ref = workdir_lib.restore_params(reference, 8, abstract)
  _, params_killed = workdir_lib.restore_params(killed, 8, abstract)
  for a, b in zip(jax.tree.leaves(params_ref), jax.tree.leaves(params_killed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Slow: signals are covered by default in tests/test_resume.py (a signal inside an async save).
@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    th.train_command(workdir, "--config.train.steps=1000", "--config.checkpoint.every_steps=500"),
    env=th.env_with(),
    cwd=th.REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  th.wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "checkpoint saved" in err
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps and 3 <= max(steps) < 500


def test_nan_loss_stops_and_sets_aside_the_checkpoint_that_caused_it(tmp_path):
  """lr 1e36 from step 1: step 2's loss is not finite, so the checkpoint of step 1 (the weights
  that loss came from) is not a good one; tests/test_resume.py covers a kept good checkpoint."""
  from jaxpref.training import trainer

  config = _tiny_config(
    train__learning_rate=1e36,
    train__steps=50,
    train__grad_clip=0.0,
    train__warmup_steps=0,
    checkpoint__every_steps=1,
    checkpoint__async_save=False,
  )
  workdir = tmp_path / "run"
  with pytest.raises(trainer.TrainingError, match="became") as info:
    trainer.train_and_evaluate(config, workdir)
  assert "\n" not in str(info.value)
  assert "at step 2" in str(info.value) and "no checkpoint from before" in str(info.value)
  assert (workdir / "diverged_checkpoints" / "1").is_dir()
  assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]


def test_bad_override_is_one_clear_line(tmp_path):
  proc = th.run_train(tmp_path / "run", "--config.train.lerning_rate=0.1", check=False)
  assert proc.returncode != 0
  assert "lerning_rate" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_bad_data_is_one_clear_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": ["a", "b"], "score": [1.0, 0.0]}\n{"text": ["a"], "score": [1.0\n')
  proc = th.run_train(
    tmp_path / "run", f"--config.data.files={bad}", "--config.train.batch_size=1", check=False
  )
  assert proc.returncode == 2
  assert "bad.jsonl:2" in proc.stderr
  assert "Traceback" not in proc.stderr
