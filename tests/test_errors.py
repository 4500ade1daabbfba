"""Every program answers bad input with one line, exit code 2 and no traceback (issue 15).

Each program runs as a user runs it: once for real (`python -m jaxpref.X`), and for the many
cases through `program_runner.py`, which feeds argv lists to the same flags parser and
`cli.run_main` in one process per program (one JAX start instead of one per case).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers as th

RUNNER = str(Path(__file__).with_name("program_runner.py"))
GOOD = {"prompt": "q", "chosen": "a good answer", "rejected": "a bad answer"}
WORDS = ["q", "a", "good", "bad", "answer", "fine", "text"]


def run_cases(program: str, cases: list[list[str]], tmp_path: Path) -> list[dict]:
  path = tmp_path / f"cases_{program}.json"
  path.write_text(json.dumps(cases))
  env = th.env_with()
  env["PYTHONPATH"] = os.pathsep.join([str(th.REPO), str(th.REPO / "tests")])
  proc = subprocess.run(
    [sys.executable, RUNNER, program, str(path)],
    env=env,
    cwd=th.REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for result in results:  # absl's log lines reach the process's stderr, not a case's
    result["log"] = proc.stderr
  return results


PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's bar, drawn before a failure shows up


def assert_one_line_error(result: dict, program: str, *needles: str) -> str:
  lines = [
    line
    for line in result["stderr"].replace("\r", "\n").splitlines()
    if line.strip() and not PROGRESS_BAR.search(line)
  ]
  assert result["code"] == 2, result["stderr"][-3000:]
  assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"jaxpref.{program}: error: "), lines
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def bad_files(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
  """`{case: (file, where the message points, what it says)}`: the unreadable inputs of issue 15."""
  line = json.dumps(GOOD) + "\n"
  d = tmp_path / "bad"
  d.mkdir(exist_ok=True)
  gz = gzip.compress((line * 300).encode())
  latin1 = json.dumps({**GOOD, "prompt": "caf\u00e9"}, ensure_ascii=False) + "\n"
  contents = {
    "truncated_gz": ("truncated.jsonl.gz", gz[: len(gz) // 2], "", "truncated or corrupt"),
    "utf16_bom": ("utf16.jsonl", (line * 3).encode("utf-16"), "", "UTF-16"),
    "utf16_no_bom": ("utf16le.jsonl", (line * 3).encode("utf-16-le"), "", "UTF-16"),
    "latin1": ("latin1.jsonl", latin1.encode("latin-1"), ":1", "not UTF-8"),
    "garbage": ("garbage.jsonl", bytes(range(256)) * 8, "", "binary content"),
    "duplicate_key": (
      "dup.jsonl",
      b'{"prompt": "q", "chosen": "a", "rejected": "b", "chosen": "b"}\n',
      ":1",
      "duplicate key 'chosen'",
    ),
  }
  files = {}
  for case, (name, data, line_suffix, needle) in contents.items():
    (d / name).write_bytes(data)
    files[case] = (d / name, f"{d / name}{line_suffix}", needle)
  return files


# ------------------------------------------------------------------------------------------------
# The reader alone: every case, both on_error policies (fast, no program start).
# ------------------------------------------------------------------------------------------------
def test_reader_bad_inputs_are_one_line(tmp_path):
  from jaxpref.data import errors, reader

  for case, (path, where, needle) in bad_files(tmp_path).items():
    with pytest.raises(errors.DataError) as info:
      reader.read_preferences(path)
    message = str(info.value)
    assert "\n" not in message and needle in message and message.startswith(where), (case, message)
    if case in ("latin1", "duplicate_key"):  # One bad line: skipped and counted.
      items, summary = reader.read_preferences(path, on_error="skip")
      assert items == [] and summary.skipped_by_reason == {errors.INVALID_JSON: 1}, case


def test_reader_drops_a_utf8_bom(tmp_path):
  from jaxpref.data import reader

  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
  items, _ = reader.read_preferences(path)
  assert len(items) == 2 and items[0].texts == ("qa good answer", "qa bad answer")


def test_reader_duplicate_key_in_a_json_list(tmp_path):
  from jaxpref.data import errors, reader

  path = tmp_path / "dup.json"
  path.write_text(
    '[{"text": ["a", "b"], "score": [1, 0]}, {"text": ["a", "b"], "score": [1, 0], '
    '"score": [0, 1]}]'
  )
  with pytest.raises(errors.DataError, match=r"dup.json\[record 1\]: duplicate key 'score'"):
    reader.read_preferences(path)
  items, summary = reader.read_preferences(path, on_error="skip")
  assert len(items) == 1 and summary.skipped == 1


def test_comma_in_a_data_path(tmp_path):
  from jaxpref.training.data import split_files

  odd = tmp_path / "a,b.jsonl"
  odd.write_text(json.dumps(GOOD) + "\n")
  assert split_files(str(odd)) == [str(odd)]
  assert split_files(f"{tmp_path}/a\\,b.jsonl, other.jsonl") == [str(odd), "other.jsonl"]
  assert split_files("x.json,y.json") == ["x.json", "y.json"]


def test_chat_template_sandbox_violation_is_one_line():
  from jaxpref import testing
  from jaxpref.data import errors, formats, reader, sources

  tok = testing.word_tokenizer(words=WORDS)
  tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
  record = {
    "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
  }
  rec = sources.RawRecord("chat.jsonl:1", 1, value=record)
  with pytest.raises(errors.DataConfigError, match="chat template cannot run") as info:
    reader.read_records([rec], source="chat.jsonl", default_task="chat", tokenizer=tok)
  assert "\n" not in str(info.value)
  # A template that refuses a conversation (raise_exception) rejects that record only.
  tok.chat_template = "{{ raise_exception('roles must alternate') }}"
  with pytest.raises(errors.DataError, match="chat.jsonl:1: the chat template refused"):
    reader.read_records([rec], source="chat.jsonl", default_task="chat", tokenizer=tok)
  items, summary = reader.read_records(
    [rec], source="chat.jsonl", default_task="chat", tokenizer=tok, on_error="skip"
  )
  assert items == [] and summary.skipped == 1
  assert formats  # The module that renders chats; imported for the reader's parsers.


# ------------------------------------------------------------------------------------------------
# The programs.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, gpt2_tokenizer_file):
  """A tiny random GPT-NeoX reward model (vocab 64, 64 rotary positions) saved three ways: with
  its own small tokenizer, with NaN weights, and with GPT-2's 50,257-token tokenizer (a vocabulary
  mismatch); and a tiny BERT (64 learned positions). Written by `hf_io.save_hf` (transformers
  reads it; test_hf_io checks that), without torch."""
  import jax
  import numpy as np

  from jaxpref import testing
  from jaxpref.data.tokenize import load_tokenizer
  from jaxpref.models import hf_io, reward_model
  from jaxpref.models.config import ModelConfig

  cfg = ModelConfig(
    vocab_size=64,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=0,
  )
  params = reward_model.init_params(cfg, jax.random.PRNGKey(0))
  nan_params = jax.tree.map(lambda p: np.full(p.shape, np.nan, np.float32), params)
  small = testing.word_tokenizer(words=WORDS, vocab_size=64)
  root = tmp_path_factory.mktemp("models")
  dirs = {}
  for name, weights, tokenizer in (
    ("ok", params, small),
    ("nan", nan_params, small),
    ("big_vocab", params, load_tokenizer(gpt2_tokenizer_file)),
  ):
    dirs[name] = hf_io.save_hf(root / name, cfg, weights, tokenizer)
  bert = ModelConfig(
    arch="bert", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
    max_position_embeddings=64, pooling="pooler", head_bias=True, pad_token_id=0,
  )  # fmt: skip
  bert_params = reward_model.init_params(bert, jax.random.PRNGKey(0))
  dirs["bert"] = hf_io.save_hf(root / "bert", bert, bert_params, small)
  return dirs


# `--max_length` beyond the model's positions: BERT's learned table has none there (an error, as
# for `data.max_length` in training); rotary positions exist but were never trained (a warning).
def max_length_cases(hf_models, data: Path, out: str):
  error = (
    [f"--model={hf_models['bert']}", f"--data={data}", f"--output={out}", "--max_length=128"],
    ("--max_length=128", "only 64 learned positions", "max_position_embeddings=64"),
  )
  warning = [f"--model={hf_models['ok']}", f"--data={data}", f"--output={out}", "--max_length=128"]
  return error, warning


def assert_max_length_warning(result: dict) -> None:
  assert result["code"] == 0, result["stderr"][-3000:]
  assert "Traceback" not in result["stderr"]
  # Only this case can log it: the BERT case fails before any warning.
  assert "--max_length=128 exceeds the model's max_position_embeddings=64" in result["log"]


def test_score_errors(tmp_path, hf_models):
  out = str(tmp_path / "out.jsonl")
  good = tmp_path / "good.jsonl"
  good.write_text(json.dumps({"text": "a good answer"}) + "\n")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  empty_list = tmp_path / "empty_list.jsonl"
  empty_list.write_text('{"text": ["a"]}\n{"text": []}\n')
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "model_config.json").write_text("{}")
  (workdir / "config.json").write_text("{}")
  files = bad_files(tmp_path)
  model = f"--model={hf_models['ok']}"
  cases = {
    name: ([model, f"--data={path}", f"--output={out}"], (where, needle))
    for name, (path, where, needle) in files.items()
  }
  cases["empty_file"] = ([model, f"--data={empty}", f"--output={out}"], (str(empty), "no records"))
  cases["empty_text_list"] = (
    [model, f"--data={empty_list}", f"--output={out}"],
    (f"{empty_list}:2", "'text' is an empty list"),
  )
  cases["nan_weights"] = (
    [f"--model={hf_models['nan']}", f"--data={good}", f"--output={out}"],
    ("rewards are NaN/inf", "weights are not finite"),
  )
  cases["vocab"] = (
    [f"--model={hf_models['big_vocab']}", f"--data={good}", f"--output={out}"],
    ("token id", ">= the model's vocab_size 64"),
  )
  cases["workdir_as_model"] = (
    [f"--model={workdir}", f"--data={good}", f"--output={out}"],
    ("is a jaxpref training workdir", f"--workdir={workdir}"),
  )
  cases["batch_size"] = (
    [model, f"--data={good}", f"--output={out}", "--batch_size=0"],
    ("--batch_size=0: must be >= 1",),
  )
  cases["hub_id"] = (
    ["--model=EleutherAI/pythia-14m", f"--data={good}", f"--output={out}"],
    ("hf download EleutherAI/pythia-14m",),
  )
  # --on_error=skip: a Latin-1 line is skipped and counted, the good line scored.
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_bytes(b'{"text": "a good answer"}\n{"text": "caf\xe9"}\n')
  skip_argv = [model, f"--data={mixed}", f"--output={out}", "--on_error=skip"]
  cases["max_length"], warn_argv = max_length_cases(hf_models, good, out)
  *results, warned, ok = run_cases(
    "score", [argv for argv, _ in cases.values()] + [warn_argv, skip_argv], tmp_path
  )
  for (case, (_, needles)), result in zip(cases.items(), results):
    try:
      assert_one_line_error(result, "score", *needles)
    except AssertionError as e:
      raise AssertionError(f"case {case}: {e}") from None
  assert_max_length_warning(warned)
  assert ok["code"] == 0, ok["stderr"][-2000:]
  assert '"invalid_json": 1' in ok["stderr"]
  (scored,) = [json.loads(line) for line in Path(out).read_text().splitlines()]
  assert scored["text"] == "a good answer" and math.isfinite(scored["reward"])


def test_eval_errors(tmp_path, hf_models):
  out = str(tmp_path / "eval")
  good = tmp_path / "good.jsonl"
  good.write_text((json.dumps(GOOD) + "\n") * 4)
  skipped = tmp_path / "all_ties.jsonl"
  skipped.write_text(json.dumps({"text": ["a", "b"], "score": [1, 1]}) + "\n")
  files = bad_files(tmp_path)
  model = f"--model={hf_models['ok']}"
  cases = {
    "latin1": (
      [model, f"--data={files['latin1'][0]}", f"--output={out}"],
      (files["latin1"][1], "not UTF-8"),
    ),
    "no_items": (
      [model, f"--data={skipped}", f"--output={out}", "--on_tie=skip"],
      (str(skipped), "no items to evaluate", "no_preference=1"),
    ),
    "nan_weights": (
      [f"--model={hf_models['nan']}", f"--data={good}", f"--output={out}"],
      ("rewards are NaN/inf", "weights are not finite"),
    ),
    "vocab": (
      [f"--model={hf_models['big_vocab']}", f"--data={good}", f"--output={out}"],
      ("token id", "vocab_size 64"),
    ),
  }
  cases["before_eos_bert"] = (
    [f"--model={hf_models['bert']}", f"--data={good}", f"--output={out}",
     "--special_tokens=paper_before_eos"],
    ("special_tokens=paper_before_eos reads the token before the EOS", "bert with pooler"),
  )  # fmt: skip
  cases["max_length"], warn_argv = max_length_cases(hf_models, good, out)
  *results, warned = run_cases("eval", [argv for argv, _ in cases.values()] + [warn_argv], tmp_path)
  for (case, (_, needles)), result in zip(cases.items(), results):
    try:
      assert_one_line_error(result, "eval", *needles)
    except AssertionError as e:
      raise AssertionError(f"case {case}: {e}") from None
  assert_max_length_warning(warned)


CONFIG_CASES = {
  "train.log_every_steps=0": "train.log_every_steps=0: must be >= 1",
  "checkpoint.every_steps=0": "checkpoint.every_steps=0: must be >= 1",
  "train.grad_accum_steps=0": "train.grad_accum_steps=0: must be >= 1",
  "train.learning_rate=-0.001": "train.learning_rate=-0.001: must be > 0",
  "data.max_length=1": "data.max_length=1: must be >= 2",
  "loss.kind=bt": "loss.kind='bt': choose one of 'ranking', 'multitask', 'more'",
  "loss.more_alpha=1.5": "loss.more_alpha=1.5 must be in (0, 1]",
  "train.schedule=cos": "train.schedule='cos': choose one of 'cosine'",
  "model.pooling=avg": "model.pooling='avg': choose one of",
  "model.dtype=fp8": "model.dtype='fp8': choose one of 'float32'",
  "data.on_tie=drop": "data.on_tie='drop'",
  "data.responses_per_item=1": "data.responses_per_item=1",
  "train.learnin_rate=0.1": "unknown config key config.train.learnin_rate; did you mean "
  "config.train.learning_rate?",
  "bogus=1": "unknown config key config.bogus",
  "train.more_alpha=0.5": "did you mean config.loss.more_alpha?",
  "loss.task_presence=ties": "loss.task_presence='ties': choose one of 'pairs', 'items'",
  "data.special_tokens=eos": "data.special_tokens='eos': choose one of",
  # Two overrides (space-separated): the official reading needs a causal decoder's last token.
  "data.special_tokens=paper_before_eos model.pooling=mean": "data.special_tokens="
  "'paper_before_eos': reads the token before the EOS without it",
}


def test_train_config_errors_before_any_data_is_read(tmp_path, hf_models):
  """Each bad value is one line naming its key; no data file is opened (data.files points to a
  file that does not exist, so reading it would be a different error)."""
  missing = tmp_path / "not_read.jsonl"
  base = [f"--config={th.TINY}", f"--workdir={tmp_path / 'run'}", f"--config.data.files={missing}"]
  cases = [[*base, *(f"--config.{c}" for c in case.split())] for case in CONFIG_CASES]
  cases.append([f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path / 'run'}"])
  hub = [f"--config={th.TINY}", f"--workdir={tmp_path / 'run2'}", f"--config.data.files={missing}"]
  cases.append([*hub, "--config.model.path=EleutherAI/pythia-14m"])
  nan = [f"--config={th.TINY}", f"--workdir={tmp_path / 'run3'}", f"--config.data.files={missing}"]
  cases.append([*nan, f"--config.model.path={hf_models['nan']}"])
  results = run_cases("train", cases, tmp_path)
  assert_one_line_error(results.pop(), "train", "weights are not finite", str(hf_models["nan"]))
  for (case, needle), result in zip(CONFIG_CASES.items(), results):
    try:
      assert_one_line_error(result, "train", needle)
    except AssertionError as e:
      raise AssertionError(f"case {case}: {e}") from None
  assert_one_line_error(results[-2], "train", "nope.py: no such config file")
  assert_one_line_error(results[-1], "train", "hf download EleutherAI/pythia-14m")
  assert not (tmp_path / "run").exists()


def test_help_exits_0_and_lists_config_keys():
  env = th.env_with()
  proc = subprocess.run(
    [sys.executable, "-m", "jaxpref.train", "--help"],
    env=env,
    cwd=th.REPO,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  for key in (
    "--workdir",
    "--config.train.learning_rate=1e-05",
    "--config.loss.kind='multitask'",
    "--config.data.responses_per_item=0",
  ):
    assert key in proc.stdout, key


@pytest.mark.parametrize(
  "program",
  [
    "score",
    pytest.param("eval", marks=pytest.mark.slow),
    pytest.param("export", marks=pytest.mark.slow),
  ],
)
def test_program_help_and_a_real_error(program, tmp_path):
  """Through `python -m` itself: `--help` exits 0; a UTF-16 file is one line with exit 2."""
  env = th.env_with()
  proc = subprocess.run(
    [sys.executable, "-m", f"jaxpref.{program}", "--help"],
    env=env,
    cwd=th.REPO,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0 and "--output" in proc.stdout, proc.stderr[-2000:]
  if program == "export":
    return
  data = tmp_path / "utf16.jsonl"
  data.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      f"jaxpref.{program}",
      "--model=/nonexistent",
      f"--data={data}",
      f"--output={tmp_path / 'out'}",
    ],
    env=env,
    cwd=th.REPO,
    capture_output=True,
    text=True,
  )
  if program == "score":  # score reads its data first; eval loads the model first.
    assert_one_line_error({"code": proc.returncode, "stderr": proc.stderr}, program, "UTF-16")
  else:
    assert_one_line_error({"code": proc.returncode, "stderr": proc.stderr}, program, "/nonexistent")


# ------------------------------------------------------------------------------------------------
# A default training run: ranked lists of 4 responses, a quiet console, the closing summary.
# ------------------------------------------------------------------------------------------------
def test_ranked_lists_train_on_all_pairs_with_a_quiet_console(tmp_path):
  """N > 2 responses per item train on all N(N-1)/2 pairs (no config key needed), and the
  console of a default run is jaxpref's own lines, the progress bar and the final summary."""
  rows = [
    {"text": [f"question {i} answer {j} " * 3 for j in range(4)], "score": [3.0, 2.0, 1.0, 0.0]}
    for i in range(60)
  ]
  data = tmp_path / "ranked.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  workdir = tmp_path / "run"
  proc = th.run_train(
    workdir,
    f"--config.data.files={data}",
    "--config.train.batch_size=4",
    "--config.train.steps=2",
    "--config.data.eval_fraction=0.1",
    "--config.data.resampling_size=0",
  )
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r for r in records if "loss" in r]
  assert losses and all(r["pairs"] == 4 * 6 for r in losses)  # 4 items x 6 pairs each

  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  own = {p.name for p in (th.REPO / "jaxpref").rglob("*.py")}
  log_lines = [line for line in lines if line[:1] in "IWEF" and "] " in line and ".py:" in line]
  library_info = [
    line
    for line in log_lines
    if line.startswith("I") and line.split("] ")[0].split()[-1].split(":")[0] not in own
  ]
  assert not library_info, library_info
  assert not any("topology" in line for line in lines)
  assert any("100%" in line and "train" in line for line in lines)  # the progress bar
  first = next(i for i, line in enumerate(lines) if "jaxpref.train: finished at step 2" in line)
  summary = lines[first:]
  assert summary[1].split() == ["held-out", "accuracy", "ECE-10", "pairs"]
  assert summary[2].split()[0] == "ranked" and summary[-2].strip().startswith("checkpoint:")
  assert f"python -m jaxpref.export --workdir={workdir}" in summary[-1]


def test_max_length_against_the_model(caplog):
  """Beyond learned positions (BERT) is an error; beyond rotary positions and tiny lengths warn."""
  from jaxpref.models.config import ModelConfig
  from jaxpref.training import config as train_config

  config = th.tiny_config(lock=False, data__max_length=4096)
  with pytest.raises(train_config.ConfigError, match=r"data.max_length=4096: .* 512 learned"):
    train_config.check_lengths(config, ModelConfig(arch="bert", max_position_embeddings=512))
  with caplog.at_level("WARNING", logger="absl"):
    train_config.check_lengths(config, ModelConfig(max_position_embeddings=512))
    config.data.max_length = 8
    train_config.check_lengths(config, ModelConfig(max_position_embeddings=512))
  warnings = [r.getMessage() for r in caplog.records]
  assert any("exceeds the model's max_position_embeddings=512" in w for w in warnings)
  assert any("data.max_length=8 is tiny" in w for w in warnings)


def test_console_filter_keeps_jaxpref_info_and_everyones_warnings():
  import logging

  from jaxpref import cli

  def record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, "message", None, None)

  quiet = cli._OnlyJaxprefInfo()
  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not quiet.filter(record(orbax, logging.INFO))
  assert quiet.filter(record(orbax, logging.WARNING))
  assert quiet.filter(record(str(th.REPO / "jaxpref" / "trainer.py"), logging.INFO))


def test_aot_validates_the_config(tmp_path):
  (result,) = run_cases(
    "aot", [[f"--config={th.TINY}", "--config.train.grad_accum_steps=0"]], tmp_path
  )
  assert_one_line_error(result, "aot", "config: train.grad_accum_steps=0: must be >= 1")
