"""One model, one reward: training, evaluation, scoring, the export and plain transformers feed the
model the same tokens (the input contract, docs/what_the_model_sees.md) and agree < 1e-4."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import train_helpers as th

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
MAX_LENGTH = 32  # most helpful.json texts are longer: every path must truncate alike.


# --- helpers --------------------------------------------------------------------------------------


def _write_items(path: Path, items) -> Path:
  """Items as a text_score file, which `jaxpref.eval` and `jaxpref.score` ({"text": [...]}) read."""
  rows = [{"text": list(it.texts), "score": [float(s) for s in it.scores]} for it in items]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _transformers_rewards(export: Path, texts: list[str], *, sides=("right", "left")) -> dict:
  """Rewards of a plain transformers user: one text at a time, batched, and the pipeline."""
  tok = transformers.AutoTokenizer.from_pretrained(export)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
  out = {}
  with torch.no_grad():
    out["single"] = np.array(
      [model(**tok(t, truncation=True, return_tensors="pt")).logits[0, 0].item() for t in texts]
    )
    for side in sides:
      tok.padding_side = side
      enc = tok(texts, truncation=True, padding=True, return_tensors="pt")
      out[f"batched_{side}"] = model(**enc).logits[:, 0].numpy()
  pipe = transformers.pipeline("text-classification", model=str(export), function_to_apply="none")
  out["pipeline"] = np.array([o["score"] for o in pipe(texts, truncation=True, batch_size=8)])
  return out


def _pair_metrics(rewards_flat: np.ndarray, items) -> tuple[float, float]:
  """Accuracy and ECE-10 (jaxpref.calibration) of two-response items from flat rewards."""
  from jaxpref.evaluation import calibration

  rewards = rewards_flat.reshape(len(items), 2)
  scores = np.array([it.scores for it in items], np.float32)
  report = calibration.calibration_report(rewards, scores, n_bootstrap=0)
  return report["accuracy"], report["ece_10"]


def _jaxpref_rewards(cfg, params, tokenizer, contract, texts) -> np.ndarray:
  from jaxpref.data.tokenize import encode_texts
  from jaxpref.evaluation.scoring import Scorer

  ids, _ = encode_texts(texts, tokenizer, contract.tokenize_options())
  scorer = Scorer(cfg, params, max_length=contract.max_length, pad_token_id=contract.pad_id or 0)
  return scorer.score_token_ids(ids)


# --- a run trained in process (default test run) --------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory, preferences_dir):
  """A 2-step gpt_neox run on 80 long helpful pairs, cut to 32 tokens; and its final eval."""
  from jaxpref.training import trainer

  tmp = tmp_path_factory.mktemp("contract")
  rows = json.loads((preferences_dir / "helpful.json").read_text())[:80]
  data = tmp / "helpful.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = th.tiny_config(
    lock=False,
    data__files=str(data),
    data__max_length=MAX_LENGTH,
    data__eval_fraction=0.25,
    data__on_tie="skip",
    train__batch_size=4,
    train__steps=2,
    checkpoint__async_save=False,
  )
  final = {}
  workdir = tmp / "run"
  trainer.train_and_evaluate(config, workdir, on_final_eval=final.update)
  return {"tmp": tmp, "config": config, "workdir": workdir, "final": final}


@pytest.mark.parity
def test_every_path_gives_the_training_reward(run):
  from jaxpref.evaluation import best_of_n
  from jaxpref.evaluation import evaluator as evaluation
  from jaxpref.evaluation import report as eval_lib
  from jaxpref.evaluation.scoring import Scorer
  from jaxpref.models import hf_export as export
  from jaxpref.models import hf_io
  from jaxpref.models.source import load_for_inference, load_tokenizer_and_contract
  from jaxpref.training import data as train_data

  workdir, tmp = run["workdir"], run["tmp"]
  cfg, params, _, step = load_for_inference(workdir=str(workdir))

  # In-training evaluation: the trainer's own data preparation and evaluator.
  tokenizer = train_data.load_tokenizer(run["config"])
  contract = train_data.configure_input(run["config"], tokenizer, cfg)
  data = train_data.prepare(run["config"], tokenizer, contract=contract)
  (task,) = data.eval_items
  items = data.eval_items[task]
  evaluator = evaluation.TrainEvaluator(
    cfg, data.eval_items, data.tokenizer, batch_size=8, contract=data.contract
  )
  train_rewards_bn, _ = evaluation.collect_rewards(cfg, params, evaluator.batches[task])
  train_rewards = train_rewards_bn.reshape(-1)
  texts = [t for it in items for t in it.texts]
  assert data.contract.max_length == MAX_LENGTH
  assert sum(len(data.tokenizer(t)["input_ids"]) > MAX_LENGTH for t in texts) > len(texts) // 2

  # jaxpref.eval's path with the workdir's stored contract.
  tokenizer, contract = load_tokenizer_and_contract(cfg, workdir=str(workdir))
  assert contract == data.contract
  eval_rewards = _jaxpref_rewards(cfg, params, tokenizer, contract, texts)
  np.testing.assert_allclose(eval_rewards, train_rewards, atol=TOL)
  eval_file = _write_items(tmp / "held_out.jsonl", items)
  reports = eval_lib.evaluate_files(
    cfg,
    params,
    tokenizer,
    [str(eval_file)],
    tmp / "eval",
    contract=contract,
    batch_size=8,
    on_error="raise",
    n_bootstrap=0,
    run={"workdir": str(workdir), "step": step},
  )
  for metric in ("accuracy", "ece_10"):
    assert reports["held_out"][metric] == pytest.approx(run["final"][task][metric], abs=1e-5)
  report_json = json.loads((tmp / "eval" / "report.json").read_text())
  assert report_json["run"]["step"] == step
  assert report_json["run"]["contract"]["max_length"] == MAX_LENGTH

  # jaxpref.score (--workdir) on the same texts, one record per pair.
  records = [(i + 1, {"text": list(it.texts)}) for i, it in enumerate(items)]
  scorer = Scorer(cfg, params, max_length=contract.max_length, pad_token_id=contract.pad_id)
  notes = Counter()
  scored, _ = best_of_n.score_records(
    scorer, tokenizer, records, contract=contract, template="{prompt}{response}",
    on_error="raise", source="pairs", counts=notes,
  )  # fmt: skip
  score_rewards = np.array([r for out in scored for r in out["rewards"]])
  np.testing.assert_allclose(score_rewards, train_rewards, atol=TOL)
  assert notes["truncated"] > len(texts) // 2

  # The export: jaxpref.score --model=EXPORT and plain transformers.
  exported = tmp / "export"
  export.export(workdir, exported)
  cfg_x, params_x = hf_io.load_hf(exported)
  tok_x, contract_x = load_tokenizer_and_contract(cfg_x, model=str(exported))
  assert contract_x == contract
  np.testing.assert_allclose(
    _jaxpref_rewards(cfg_x, params_x, tok_x, contract_x, texts), train_rewards, atol=TOL
  )
  for path, rewards in _transformers_rewards(exported, texts).items():
    np.testing.assert_allclose(rewards, train_rewards, atol=TOL, err_msg=path)
    accuracy, ece = _pair_metrics(rewards, items)
    assert accuracy == pytest.approx(run["final"][task]["accuracy"], abs=1e-6), path
    assert ece == pytest.approx(run["final"][task]["ece_10"], abs=1e-4), path


@pytest.mark.parity
def test_old_workdir_without_contract_is_inferred(run, caplog):
  """A workdir written before contracts (raw tokenizer, no input_contract.json) scores the same."""
  from jaxpref.data import contract as input_contract
  from jaxpref.data.tokenize import load_tokenizer
  from jaxpref.models.source import load_for_inference, load_tokenizer_and_contract

  old = run["tmp"] / "old_run"
  shutil.copytree(run["workdir"], old)
  (old / "input_contract.json").unlink()
  shutil.rmtree(old / "tokenizer")
  load_tokenizer(run["config"].data.tokenizer).save_pretrained(old / "tokenizer")
  cfg, params, _, _ = load_for_inference(workdir=str(old))
  with caplog.at_level("WARNING"):
    tok, contract = load_tokenizer_and_contract(cfg, workdir=str(old))
    load_tokenizer_and_contract(cfg, workdir=str(old))
  said = [r for r in caplog.records if "inferred" in r.getMessage()]
  assert len(said) == 1 and "no input_contract.json" in said[0].getMessage()
  new_tok, new_contract = load_tokenizer_and_contract(cfg, workdir=str(run["workdir"]))
  assert contract == new_contract
  texts = ["Human: hi there, how are you today my friend? " * 5, "short text"]
  np.testing.assert_allclose(
    _jaxpref_rewards(cfg, params, tok, contract, texts),
    _jaxpref_rewards(cfg, params, new_tok, new_contract, texts),
    atol=TOL,
  )
  assert input_contract.read(old) is None


def test_score_counts_best_of_n_made_identical_by_truncation(run):
  from jaxpref.evaluation import best_of_n
  from jaxpref.evaluation.scoring import Scorer
  from jaxpref.models.source import load_for_inference, load_tokenizer_and_contract

  cfg, params, _, _ = load_for_inference(workdir=str(run["workdir"]))
  tok, contract = load_tokenizer_and_contract(cfg, workdir=str(run["workdir"]))
  prompt = "Human: tell me a long story about a cat. " * 10
  records = [(1, {"prompt": prompt, "responses": [" Assistant: yes.", " Assistant: no."]})]
  scorer = Scorer(cfg, params, max_length=contract.max_length, pad_token_id=contract.pad_id)
  kwargs = dict(template="{prompt}{response}", on_error="raise", source="bon")
  left, right = Counter(), Counter()
  best_of_n.score_records(scorer, tok, records, contract=contract, counts=left, **kwargs)
  assert left["identical_after_truncation"] == 0  # left truncation keeps the responses
  out, skipped = best_of_n.score_records(
    scorer, tok, records, contract=contract.replace(truncation_side="right"), counts=right, **kwargs
  )
  assert right["identical_after_truncation"] == 1 and not skipped
  assert out[0]["rewards"][0] == out[0]["rewards"][1]


@pytest.mark.slow
def test_eval_cli_uses_the_runs_contract(run):
  out = run["tmp"] / "eval_cli"
  data = run["tmp"] / "held_out.jsonl"
  if not data.is_file():
    pytest.skip("needs the held-out file of test_every_path_gives_the_training_reward")
  proc = subprocess.run(
    [sys.executable, "-m", "jaxpref.eval", f"--workdir={run['workdir']}", f"--data={data}",
     f"--output={out}", "--n_bootstrap=0", "--batch_size=8"],
    env=th.env_with(), cwd=th.REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "report.json").read_text())
  assert report["run"]["contract"]["max_length"] == MAX_LENGTH
  assert report["run"]["step"] == 2 and report["run"]["workdir"] == str(run["workdir"])
  assert report["held_out"]["accuracy"] == pytest.approx(
    json.loads((run["tmp"] / "eval" / "report.json").read_text())["held_out"]["accuracy"]
  )
  assert "held_out" in proc.stderr  # the progress bar, named after the file


def test_export_of_a_mean_pooled_model_names_the_fix(run):
  """transformers' *ForSequenceClassification cannot mean-pool: the error names the CLI fix."""
  from jaxpref.models import hf_export as export
  from jaxpref.models import hf_io

  bad = run["tmp"] / "mean_run"
  shutil.copytree(run["workdir"], bad)
  model_config = json.loads((bad / "model_config.json").read_text())
  (bad / "model_config.json").write_text(json.dumps(model_config | {"pooling": "mean"}))
  with pytest.raises(hf_io.CheckpointError) as error:
    export.export(bad, bad / "x")
  assert "--config.model.pooling=last" in str(error.value) and "--nostrict" in str(error.value)
  export.export(bad, bad / "x", strict=False)  # what --nostrict does
  assert json.loads((bad / "x" / "config.json").read_text())["jaxpref_pooling"] == "mean"


# --- external Hugging Face checkpoints ------------------------------------------------------------


def _external_rm(tmp_path: Path, arch: str, gpt2_tokenizer_file: Path) -> tuple[Path, int]:
  """A tiny random HF reward model with its tokenizer, as someone else would save it."""
  from jaxpref.data.tokenize import load_tokenizer

  torch.manual_seed(0)
  common = dict(
    vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, num_labels=1, initializer_range=0.2, eos_token_id=50256,
  )  # fmt: skip
  tok = load_tokenizer(gpt2_tokenizer_file)
  tok.model_max_length = 48
  if arch == "gpt_neox":
    config = transformers.GPTNeoXConfig(rotary_pct=0.25, pad_token_id=50300, **common)
    model = transformers.GPTNeoXForSequenceClassification(config)
  else:
    # A tokenizer that appends EOS and pads with it: transformers pools the token before EOS.
    config_cls, model_cls = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification),
    }[arch]
    model = model_cls(config_cls(pad_token_id=50256, num_key_value_heads=2, **common))
    import tokenizers

    tok.backend_tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 50256)]
    )
  hf_dir = tmp_path / arch
  model.eval().save_pretrained(hf_dir)
  tok.save_pretrained(hf_dir)
  return hf_dir, 48


@pytest.mark.parity
@pytest.mark.parametrize(
  "arch",
  # gpt_neox through the CLI runs by default in test_eval_cli.py.
  [pytest.param("gpt_neox", marks=pytest.mark.slow), "llama", "qwen2"],
)
def test_external_checkpoint_eval_matches_transformers(
  tmp_path, arch, gpt2_tokenizer_file, preferences_dir
):
  from jaxpref.data import reader
  from jaxpref.evaluation import report as eval_lib
  from jaxpref.models.source import load_for_inference, load_tokenizer_and_contract

  hf_dir, max_length = _external_rm(tmp_path, arch, gpt2_tokenizer_file)
  rows = json.loads((preferences_dir / "helpful.json").read_text())[:40]
  data = tmp_path / "helpful_small.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  items, _ = reader.read_preferences(data, task="helpful_small")
  texts = [t for it in items for t in it.texts]

  # What a transformers user computes with the checkpoint's own tokenizer.
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  assert sum(len(tok(t)["input_ids"]) > max_length for t in texts) > len(texts) // 2
  with torch.no_grad():
    hf = np.array(
      [model(**tok(t, truncation=True, return_tensors="pt")).logits[0, 0].item() for t in texts]
    )
  accuracy, ece = _pair_metrics(hf, items)

  cfg, params, _, _ = load_for_inference(model=str(hf_dir))
  tokenizer, contract = load_tokenizer_and_contract(cfg, model=str(hf_dir))
  assert (contract.max_length, contract.truncation_side) == (max_length, "right")
  np.testing.assert_allclose(
    _jaxpref_rewards(cfg, params, tokenizer, contract, texts), hf, atol=TOL
  )
  reports = eval_lib.evaluate_files(
    cfg, params, tokenizer, [str(data)], tmp_path / "eval", contract=contract,
    batch_size=8, on_error="raise", n_bootstrap=0,
  )  # fmt: skip
  assert reports["helpful_small"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
  assert reports["helpful_small"]["ece_10"] == pytest.approx(ece, abs=1e-4)


# --- every architecture through the programs (slow) -----------------------------------------------

ARCH_OVERRIDES = {
  "gpt_neox": (),
  # Llama has no partial rotary embedding: tiny.py's rotary_pct=0.25 is GPT-NeoX's.
  "llama": ("--config.model.arch=llama", "--config.model.hidden_act=silu",
            "--config.model.rotary_pct=1.0"),
  "minilm": ("--config.model.pooling=pooler",),  # what BertForSequenceClassification classifies
}  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess:
  proc = subprocess.run(
    [sys.executable, "-m", *args], env=th.env_with(), cwd=th.REPO, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize("arch", list(ARCH_OVERRIDES))
def test_every_program_agrees_per_arch(tmp_path, arch, preferences_dir):
  """Train -> jaxpref.eval / score --workdir / export / score --model / transformers, per arch."""
  from jaxpref.data import reader

  overrides = list(ARCH_OVERRIDES[arch])
  if arch == "minilm":
    from jaxpref.models import minilm

    path = minilm.minilm_path()
    overrides += [f"--config.model.path={path}", f"--config.data.tokenizer={path}"]
  rows = json.loads((preferences_dir / "helpful.json").read_text())[:60]
  data = tmp_path / "helpful.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  workdir = tmp_path / "run"
  th.run_train(
    workdir,
    f"--config.data.files={data}",
    f"--config.data.max_length={MAX_LENGTH}",
    "--config.data.eval_fraction=0.3",
    "--config.train.steps=3",
    *overrides,
  )
  final = json.loads((workdir / "eval_final.json").read_text())
  items, _ = reader.read_preferences(data, task="helpful")
  from jaxpref.data import splits

  _, held_out = splits.split_items(items, 0.3, seed=0)
  held = _write_items(tmp_path / "held.jsonl", held_out)
  texts = [t for it in held_out for t in it.texts]

  _cli("jaxpref.eval", f"--workdir={workdir}", f"--data={held}", f"--output={tmp_path / 'ev'}",
       "--n_bootstrap=0")  # fmt: skip
  report = json.loads((tmp_path / "ev" / "report.json").read_text())
  for metric in ("accuracy", "ece_10"):
    assert report["held"][metric] == pytest.approx(final[f"eval/helpful/{metric}"], abs=1e-5)

  outputs = {}
  for name, source in (("workdir", f"--workdir={workdir}"), ("export", None)):
    if source is None:
      _cli("jaxpref.export", f"--workdir={workdir}", f"--output={tmp_path / 'x'}")
      source = f"--model={tmp_path / 'x'}"
    _cli("jaxpref.score", source, f"--data={held}", f"--output={tmp_path / name}.jsonl")
    outputs[name] = np.array(
      [r for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()
       for r in json.loads(line)["rewards"]]
    )  # fmt: skip
  np.testing.assert_allclose(outputs["export"], outputs["workdir"], atol=TOL)
  # BERT has absolute positions: transformers shifts them under left padding (jaxpref does not).
  sides = ("right",) if arch == "minilm" else ("right", "left")
  for path, rewards in _transformers_rewards(tmp_path / "x", texts, sides=sides).items():
    worst = np.abs(rewards - outputs["workdir"]).max()
    print(f"{arch} {path}: max |reward - score --workdir| = {worst:.2e}")
    np.testing.assert_allclose(rewards, outputs["workdir"], atol=TOL, err_msg=path)
    accuracy, _ = _pair_metrics(rewards, held_out)
    assert accuracy == pytest.approx(report["held"]["accuracy"], abs=1e-6), path


# --- the contract itself (no model) ---------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["auto", "paper", "paper_before_eos", "tokenizer", "none"])
def test_configured_tokenizer_call_is_jaxpref_tokenisation(tmp_path, side, mode):
  """After `configure`, a plain `tokenizer(texts, truncation=True)` (also reloaded from disk with
  AutoTokenizer) gives the ids `encode_texts` gives; the pad token is not EOS."""
  from jaxpref.data import contract as input_contract
  from jaxpref.data.tokenize import encode_texts
  from jaxpref.testing import word_tokenizer

  texts = ["a b c d e f g h i j k l", "a b", "x y z " * 5, "c"]
  tok = word_tokenizer(texts)
  tok.bos_token = "a"  # a distinct BOS, so `paper` adds one
  contract = input_contract.configure(
    tok, max_length=6, truncation_side=side, special_tokens=mode, arch="llama", pooling="last",
    vocab_size=512,
  )  # fmt: skip
  assert contract.pad_id != tok.eos_token_id and tok.pad_token_id == contract.pad_id
  rows, cut = encode_texts(texts, tok, contract.tokenize_options())
  assert cut.tolist() == [True, False, True, False]
  input_contract.save_tokenizer(tok, tmp_path / "tok", contract)
  reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
  assert input_contract.read(tmp_path / "tok") == contract
  for t in (tok, reloaded):
    plain = t(texts, truncation=True)["input_ids"]
    assert [list(r) for r in rows] == [list(p) for p in plain]
    assert t.pad_token_id == contract.pad_id


def test_contract_round_trips_and_rejects_bad_files(tmp_path):
  from jaxpref.data import contract as input_contract
  from jaxpref.data.errors import DataConfigError

  contract = input_contract.InputContract(
    max_length=8, suffix=(("</s>", 2),), pad_token="<pad>", pad_id=0
  )
  contract.write(tmp_path)
  assert input_contract.read(tmp_path) == contract
  assert "</s>" in contract.describe() and "left" in contract.describe()
  (tmp_path / "input_contract.json").write_text(json.dumps({"max_length": 8, "colour": 1}))
  with pytest.raises(DataConfigError, match="unknown input-contract field"):
    input_contract.read(tmp_path)
  with pytest.raises(DataConfigError, match="truncation_side"):
    input_contract.InputContract(max_length=8, truncation_side="middle")


def test_saved_tokenizer_loads_in_transformers_4(tmp_path):
  """pyproject admits transformers >= 4.50: a 4.x install (a site dir with transformers 4.x,
  tokenizers and huggingface_hub, named by JAXPREF_TRANSFORMERS4_PATH) loads the saved tokenizer
  and gives the same ids and model inputs."""
  import os

  site = os.environ.get("JAXPREF_TRANSFORMERS4_PATH")
  if not site:
    pytest.skip("set JAXPREF_TRANSFORMERS4_PATH to a site dir holding transformers 4.x")
  from jaxpref.data import contract as input_contract
  from jaxpref.testing import word_tokenizer

  texts = ["a b c d e f g h i j k l", "a b"]
  tok = word_tokenizer(texts)
  contract = input_contract.configure(
    tok, max_length=6, arch="gpt_neox", pooling="last", vocab_size=512
  )
  input_contract.save_tokenizer(tok, tmp_path / "tok", contract)
  script = (
    "import json, sys, transformers\n"
    "t = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
    "enc = t(json.loads(sys.argv[2]), truncation=True, padding=True)\n"
    "print(json.dumps([transformers.__version__, sorted(enc), enc['input_ids']]))\n"
  )
  env = dict(os.environ, PYTHONPATH=site)
  proc = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path / "tok"), json.dumps(texts)],
    env=env, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  version, keys, ids = json.loads(proc.stdout.strip().splitlines()[-1])
  assert version.startswith("4.")
  assert keys == ["attention_mask", "input_ids"]
  assert ids == tok(texts, truncation=True, padding=True)["input_ids"]
