"""`data.special_tokens=paper_before_eos` gives the official code's reward (dunzeng/MORE) and an
export that transformers scores the same way.

The official code tokenises `[BOS] text [EOS]`, cuts the row to `max_length` tokens and reads the
hidden state at `sequence_lengths - 2`: the token before the EOS (`reward_datasets.py`
`reward_tokenize`, `model.py`). Here that reading is computed by hand, with jaxpref's model (its
per-position hidden states) and with transformers' on an export, and compared with jaxpref's
rewards under the new mode, with texts that fit, that fill `max_length` exactly and that are cut.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
MAX_LENGTH = 12
WORDS = "the cat sat on a mat and then it ran to see what was in all of this".split()


def _texts(tokenizer) -> list[str]:
  """Texts of 1 to 18 tokens: official rows of 3 to 20 tokens, around MAX_LENGTH = 12."""
  texts = [" ".join(WORDS[:k]) for k in (1, 5, 9, 10, 11, 12, 18)]
  counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
  assert counts == [1, 5, 9, 10, 11, 12, 18], counts  # one GPT-2 token per word
  return texts


def _official_rows(tokenizer, texts, side: str, *, keep_bos: bool = False) -> list[list[int]]:
  """`reward_tokenize` of the official code: BOS + text + EOS, cut to MAX_LENGTH on `side` (the
  whole row, so a left cut drops BOS). `keep_bos`: cut the text only (what a tokenizer does)."""
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  rows = []
  for text in texts:
    ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos]
    if len(ids) >= MAX_LENGTH:
      if keep_bos:
        body = ids[1:-1]
        body = body[len(body) - (MAX_LENGTH - 2) :] if side == "left" else body[: MAX_LENGTH - 2]
        ids = [bos, *body, eos]
      else:
        ids = ids[-MAX_LENGTH:] if side == "left" else ids[:MAX_LENGTH]
    rows.append(ids)
  return rows


def _jaxpref_before_eos(cfg, params, rows) -> np.ndarray:
  """The official reading with jaxpref's model: head(hidden state at len(row) - 2), whole rows
  (right-padded into one batch; a causal model's states do not see the padding after them)."""
  import jax.numpy as jnp

  from jaxpref.models import reward_model

  lengths = np.asarray([len(r) for r in rows])
  ids = np.zeros((len(rows), lengths.max()), np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
  mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int32)
  result = reward_model.apply(
    cfg, params, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True
  )
  hidden_bld = np.asarray(result["hidden_states"][-1], np.float64)
  kernel_d = np.asarray(params["score"]["kernel"][:, 0], np.float64)
  rewards_bl = hidden_bld @ kernel_d
  index = np.arange(len(rows))
  # The last position through this path is the model's own `last` reward (a check of the path).
  np.testing.assert_allclose(rewards_bl[index, lengths - 1], result["rewards"], atol=1e-5)
  return rewards_bl[index, lengths - 2]


def _transformers_before_eos(model, rows) -> np.ndarray:
  """The official reading with transformers: the score head on the backbone's state at len - 2."""
  out = []
  with torch.no_grad():
    for row in rows:
      hidden = model.base_model(torch.tensor([row])).last_hidden_state[0]
      out.append(model.score(hidden[len(row) - 2]).item())
  return np.asarray(out)


@pytest.fixture(scope="module")
def model(gpt2_tokenizer_file):
  import jax

  from jaxpref.models import reward_model
  from jaxpref.models.config import ModelConfig

  cfg = ModelConfig(
    arch="gpt_neox", vocab_size=50304, hidden_size=16, num_layers=2, num_heads=2,
    intermediate_size=32, max_position_embeddings=64, initializer_range=0.2,
  )  # fmt: skip
  return cfg, reward_model.init_params(cfg, jax.random.PRNGKey(3))


@pytest.mark.parity
@pytest.mark.parametrize("side", ["right", "left"])
def test_paper_before_eos_is_the_official_reading(tmp_path, model, gpt2_tokenizer_file, side):
  from jaxpref.data import contract as input_contract
  from jaxpref.data.tokenize import encode_texts, load_tokenizer
  from jaxpref.evaluation.scoring import Scorer
  from jaxpref.models import hf_io

  cfg, params = model
  tok = load_tokenizer(gpt2_tokenizer_file)
  contract = input_contract.configure(
    tok, max_length=MAX_LENGTH, truncation_side=side, special_tokens="paper_before_eos",
    arch=cfg.arch, pooling="last", vocab_size=cfg.vocab_size,
  )  # fmt: skip
  assert contract.prefix_ids == (tok.bos_token_id,) and contract.suffix_ids == ()
  assert contract.row_length == MAX_LENGTH - 1 and contract.pad_id != tok.eos_token_id
  texts = _texts(tok)
  official = _official_rows(tok, texts, side)
  cut = [len(tok(t, add_special_tokens=False)["input_ids"]) + 2 > MAX_LENGTH for t in texts]
  assert cut == [False, False, False, False, True, True, True]  # 11 + 2 = 12 fits exactly

  # jaxpref: the one tokenisation path and the one scorer.
  rows, was_cut = encode_texts(texts, tok, contract.tokenize_options())
  assert was_cut.tolist() == cut
  cfg = cfg.replace(pad_token_id=contract.pad_id, eos_token_id=tok.eos_token_id)
  scorer = Scorer(cfg, params, max_length=contract.max_length, pad_token_id=contract.pad_id)
  rewards = scorer.score_token_ids(rows)

  # The official reading by hand, with jaxpref's model. Every row but a left cut is the official
  # row without its EOS; a left cut keeps BOS where the official code cuts it with the text (the
  # tokenizer of an export cannot drop it: docs/objectives.md).
  if side == "right":
    reference_rows = official
  else:
    reference_rows = _official_rows(tok, texts, side, keep_bos=True)
    for ours, theirs, c in zip(rows, official, cut):
      if c:  # the same last MAX_LENGTH - 2 text tokens; BOS where the official row has one more
        assert list(ours[1:]) == theirs[1:-1] and ours[0] == tok.bos_token_id != theirs[0]
  for ours, theirs in zip(rows, reference_rows):
    assert list(ours) == theirs[:-1]
  by_hand = _jaxpref_before_eos(cfg, params, reference_rows)
  np.testing.assert_allclose(rewards, by_hand, atol=TOL)
  if side == "right":
    np.testing.assert_allclose(rewards, _jaxpref_before_eos(cfg, params, official), atol=TOL)

  # An export, as jaxpref.export writes it: transformers' plain calls give jaxpref's rewards,
  # and its own state before the EOS of the official rows gives them too.
  export = tmp_path / "export"
  hf_io.save_hf(export, cfg, params, None, pad_token_id=contract.pad_id)
  input_contract.save_tokenizer(tok, export, contract)
  hf_tok = transformers.AutoTokenizer.from_pretrained(export)
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
  assert hf_tok.model_max_length == MAX_LENGTH - 1
  assert [list(r) for r in rows] == hf_tok(texts, truncation=True)["input_ids"]
  with torch.no_grad():
    single = [
      hf_model(**hf_tok(t, truncation=True, return_tensors="pt")).logits.item() for t in texts
    ]
    batch = hf_tok(texts, truncation=True, padding=True, return_tensors="pt")
    batched = hf_model(**batch).logits[:, 0].numpy()
  np.testing.assert_allclose(single, rewards, atol=TOL)
  np.testing.assert_allclose(batched, rewards, atol=TOL)
  np.testing.assert_allclose(_transformers_before_eos(hf_model, reference_rows), rewards, atol=TOL)


def test_paper_before_eos_needs_a_causal_decoder_with_last_pooling(gpt2_tokenizer_file):
  from jaxpref.data import contract as input_contract
  from jaxpref.data.errors import DataConfigError
  from jaxpref.data.tokenize import load_tokenizer

  tok = load_tokenizer(gpt2_tokenizer_file)
  for arch, pooling in (("bert", "pooler"), ("bert", "last"), ("gpt_neox", "mean")):
    with pytest.raises(DataConfigError, match="paper_before_eos reads the token before the EOS"):
      input_contract.configure(
        tok, max_length=16, special_tokens="paper_before_eos", arch=arch, pooling=pooling,
        vocab_size=50304,
      )  # fmt: skip
  auto = input_contract.configure(
    tok, max_length=16, special_tokens="auto", arch="gpt_neox", pooling="last", vocab_size=50304
  )
  # eval/score --special_tokens=paper_before_eos --max_length=N: rows of N - 1 tokens.
  switched = input_contract.override(
    auto, tok, special_tokens="paper_before_eos", max_length=20, arch="qwen2"
  )
  assert (switched.max_length, switched.row_length, switched.suffix) == (20, 19, ())
  assert "at most 19 tokens" in switched.describe()
  with pytest.raises(DataConfigError, match="bert with last pooling"):
    input_contract.override(auto, tok, special_tokens="paper_before_eos", arch="bert")


def _program(*args: str):
  import subprocess
  import sys

  import train_helpers as th

  proc = subprocess.run(
    [sys.executable, "-m", *args], env=th.env_with(), cwd=th.REPO, capture_output=True, text=True,
    timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
@pytest.mark.parity
def test_paper_config_run_export_and_transformers_agree(tmp_path, preferences_dir):
  """The user's path: a paper config (tiny variant) trains with the official reading, and its
  export gives `jaxpref.score`'s rewards in transformers with a plain call."""
  import json

  run, export = tmp_path / "run", tmp_path / "export"
  _program(
    "jaxpref.train", "--config=configs/paper_pythia_1_4b_more.py:tiny", f"--workdir={run}",
    "--config.train.steps=2",
  )  # fmt: skip
  contract = json.loads((run / "input_contract.json").read_text())
  assert contract["special_tokens"] == "paper_before_eos" and contract["suffix"] == []
  _program("jaxpref.export", f"--workdir={run}", f"--output={export}")
  rows = json.loads((preferences_dir / "webgpt.json").read_text())[:6]
  texts = [t for r in rows for t in r["text"]]
  data = tmp_path / "texts.jsonl"
  data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  scores = tmp_path / "scores.jsonl"
  _program("jaxpref.score", f"--model={export}", f"--data={data}", f"--output={scores}")
  rewards = [json.loads(line)["reward"] for line in scores.read_text().splitlines()]
  tok = transformers.AutoTokenizer.from_pretrained(export)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
  assert tok.model_max_length == contract["max_length"] - 1  # the official EOS, left off
  with torch.no_grad():
    batch = tok(texts, truncation=True, padding=True, return_tensors="pt")
    hf = model(**batch).logits[:, 0].numpy()
  np.testing.assert_allclose(hf, rewards, atol=TOL)
