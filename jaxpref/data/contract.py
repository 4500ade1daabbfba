"""The input contract: what a reward model sees, decided once and stored with the model.

A contract fixes the special tokens put around each text, the truncation side and length, the
padding side and pad id, whether chat-message records are rendered with the tokenizer's chat
template, and the pooled position. Training decides it (`configure`), writes it to
`WORKDIR/input_contract.json`, and saves the run's tokenizer *configured* with it: a
post-processor that adds exactly the contract's special tokens, its truncation side and
`model_max_length`, and a pad token that no text ends with. An export copies both, so a plain
`AutoTokenizer.from_pretrained(EXPORT)(texts, truncation=True)` gives the token ids
jaxpref scores, and `*ForSequenceClassification`, which pools the last token that is not
`config.pad_token_id`, reads the position jaxpref pools. See docs/what_the_model_sees.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from absl import logging

from jaxpref.data import errors
from jaxpref.data.tokenize import (
  PAPER_BEFORE_EOS,
  SPECIAL_TOKENS,
  TokenizeOptions,
  row_length,
  special_affixes,
)

CONTRACT_FILE = "input_contract.json"
# The pad token added when a tokenizer has none that differs from EOS (and the model has room).
PAD_TOKEN = "<|pad|>"
# Pooled positions: `last_non_pad` is transformers' rule for *ForSequenceClassification decoders
# (the last token whose id is not the pad id); the other values are `ModelConfig.pooling` names.
LAST_NON_PAD = "last_non_pad"
# Every architecture but these is a causal decoder: its state at a token does not see later
# tokens, and transformers' *ForSequenceClassification reads its last non-pad token.
_BIDIRECTIONAL = ("bert",)
_VERSION = 1
_warned_inferred: set[str] = set()


@dataclasses.dataclass(frozen=True)
class InputContract:
  """What the model sees.

  Attributes:
    max_length: longest row in tokens, special tokens included; with `paper_before_eos` it
      also counts the EOS the official code appends, and rows are one token shorter
      (`row_length`, the configured tokenizer's `model_max_length`).
    truncation_side: which end of a long text is cut (`left` keeps the end of a conversation).
    padding_side: where a batch is padded (rewards do not depend on it, see the docs page).
    special_tokens: the mode `prefix`/`suffix` were resolved from (see `TokenizeOptions`).
    prefix, suffix: the special tokens put before / after each text's (truncated) tokens, as
      (token, id) pairs.
    pad_token, pad_id: the pad token; it differs from the suffix's last token, so the last
      token that is not the pad is the last real token.
    pooling: `ModelConfig.pooling` of the model.
    pooled_position: `last_non_pad` for decoders with `last` pooling (transformers' rule: trailing
      tokens equal to the pad id are not pooled), else the pooling name.
    chat_template: chat-message records are rendered with the tokenizer's chat template (stored
      with the tokenizer files); a template that writes BOS/EOS itself wants special_tokens=none.
  """

  max_length: int
  truncation_side: str = "left"
  padding_side: str = "right"
  special_tokens: str = "auto"
  prefix: tuple[tuple[str, int], ...] = ()
  suffix: tuple[tuple[str, int], ...] = ()
  pad_token: str | None = None
  pad_id: int | None = None
  pooling: str = "last"
  pooled_position: str = LAST_NON_PAD
  chat_template: bool = False

  def __post_init__(self):
    # Validates the sides, length and mode with TokenizeOptions' messages.
    TokenizeOptions(
      max_length=self.max_length,
      truncation_side=self.truncation_side,
      padding_side=self.padding_side,
      special_tokens=self.special_tokens,
    )

  @property
  def row_length(self) -> int:
    """The longest row the model sees (`model_max_length` of the configured tokenizer)."""
    return row_length(self.max_length, self.special_tokens)

  @property
  def prefix_ids(self) -> tuple[int, ...]:
    return tuple(i for _, i in self.prefix)

  @property
  def suffix_ids(self) -> tuple[int, ...]:
    return tuple(i for _, i in self.suffix)

  def tokenize_options(self, buckets: tuple[int, ...] | None = None) -> TokenizeOptions:
    """The options `tokenize_items` applies this contract with."""
    return TokenizeOptions(
      max_length=self.max_length,
      truncation_side=self.truncation_side,
      padding_side=self.padding_side,
      special_tokens=self.special_tokens,
      buckets=buckets,
      affixes=(self.prefix_ids, self.suffix_ids),
      strip_pad_id=self.pad_id if self.pooled_position == LAST_NON_PAD else None,
    )

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["prefix"] = [list(p) for p in self.prefix]
    out["suffix"] = [list(s) for s in self.suffix]
    return {"version": _VERSION, **out}

  @classmethod
  def from_dict(cls, fields: dict[str, Any], where: str = "contract") -> InputContract:
    fields = dict(fields)
    fields.pop("version", None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise errors.DataConfigError(f"{where}: unknown input-contract field(s) {unknown}")
    for key in ("prefix", "suffix"):
      fields[key] = tuple((str(t), int(i)) for t, i in fields.get(key, ()))
    try:
      return cls(**fields)
    except TypeError as e:
      raise errors.DataConfigError(f"{where}: {e}") from None

  def describe(self) -> str:
    """One line: `[<s>] text [</s>], 128 tokens cut on the left, pad <|pad|>=3, pooled ...`."""
    pre = " ".join(t for t, _ in self.prefix)
    suf = " ".join(t for t, _ in self.suffix)
    text = " ".join(x for x in (pre, "text", suf) if x)
    return (
      f"{text} (special_tokens={self.special_tokens}), at most {self.row_length} tokens cut on "
      f"the {self.truncation_side}, padded on the {self.padding_side} with "
      f"{self.pad_token}={self.pad_id}, pooled at {self.pooled_position}"
    )

  def replace(self, **changes) -> InputContract:
    return dataclasses.replace(self, **changes)

  def write(self, directory: str | Path) -> Path:
    path = Path(directory) / CONTRACT_FILE
    path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
    return path


def read(directory: str | Path) -> InputContract | None:
  """The contract stored in a workdir or export, or None when there is none."""
  path = Path(directory) / CONTRACT_FILE
  if not path.is_file():
    return None
  try:
    fields = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.DataConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(fields, dict):
    raise errors.DataConfigError(f"{path}: expected a JSON object")
  return InputContract.from_dict(fields, str(path))


def _check_before_eos(mode: str, arch: str | None, pooling: str) -> None:
  # Leaving the EOS off gives the official reward only where the pooled state cannot see it.
  if mode == PAPER_BEFORE_EOS and (arch in _BIDIRECTIONAL or pooling != "last"):
    raise errors.DataConfigError(
      f"special_tokens={PAPER_BEFORE_EOS} reads the token before the EOS, which only a causal "
      f"decoder with last pooling does without seeing the EOS; this model is "
      f"{arch or 'a model'} with {pooling} pooling: use special_tokens=paper"
    )


def _pooled_position(arch: str, pooling: str, pad_id: int | None) -> str:
  if arch and arch not in _BIDIRECTIONAL and pooling == "last" and pad_id is not None:
    return LAST_NON_PAD
  return pooling


def _named(tokenizer: Any, ids: list[int]) -> tuple[tuple[str, int], ...]:
  return tuple((str(tokenizer.convert_ids_to_tokens(int(i))), int(i)) for i in ids)


def _choose_pad(tokenizer: Any, avoid: set[int], vocab_size: int | None) -> None:
  """Gives `tokenizer` a pad token outside `avoid` (EOS, the suffix's last token)."""
  if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in avoid:
    return
  if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in avoid:
    tokenizer.pad_token = tokenizer.unk_token
    return
  if vocab_size is not None and len(tokenizer) >= vocab_size:
    raise errors.DataConfigError(
      f"the tokenizer's pad token is EOS and the model has no free id for a separate one "
      f"(model.vocab_size={vocab_size}, {len(tokenizer)} tokens): transformers would pool the "
      "token before EOS. Raise model.vocab_size, or use a tokenizer with its own pad token"
    )
  tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def configure(
  tokenizer: Any,
  *,
  max_length: int,
  arch: str,
  pooling: str,
  truncation_side: str = "left",
  padding_side: str = "right",
  special_tokens: str = "auto",
  vocab_size: int | None = None,
  chat_template: bool = False,
) -> InputContract:
  """Decides a training run's contract and configures `tokenizer` to apply it (in place).

  The tokenizer gets a pad token that is neither EOS nor the suffix's last token (its own pad,
  else its unknown token, else `<|pad|>` added at the first free id below `vocab_size`), so
  transformers' last-non-pad pooling reads the last real token.
  """
  if special_tokens not in SPECIAL_TOKENS:
    raise errors.DataConfigError(
      f"special_tokens={special_tokens!r}: choose one of {SPECIAL_TOKENS}"
    )
  _check_before_eos(special_tokens, arch, pooling)
  prefix_ids, suffix_ids = special_affixes(tokenizer, special_tokens)
  avoid = {i for i in (tokenizer.eos_token_id, *suffix_ids[-1:]) if i is not None}
  _choose_pad(tokenizer, avoid, vocab_size)
  pad_id = int(tokenizer.pad_token_id)
  contract = InputContract(
    max_length=max_length,
    truncation_side=truncation_side,
    padding_side=padding_side,
    special_tokens=special_tokens,
    prefix=_named(tokenizer, prefix_ids),
    suffix=_named(tokenizer, suffix_ids),
    pad_token=str(tokenizer.pad_token),
    pad_id=pad_id,
    pooling=pooling,
    pooled_position=_pooled_position(arch, pooling, pad_id),
    chat_template=chat_template,
  )
  apply(tokenizer, contract)
  return contract


def apply(tokenizer: Any, contract: InputContract) -> Any:
  """Configures `tokenizer` so that `tokenizer(texts, truncation=True)` follows `contract`.

  Sets a post-processor that adds exactly the prefix and suffix, the pad token (added when the
  tokenizer lacks it), the truncation and padding sides and `model_max_length`; then checks that
  a plain call gives prefix + text + suffix.
  """
  import tokenizers

  if contract.pad_token is not None:
    if contract.pad_token not in tokenizer.get_vocab():
      tokenizer.add_special_tokens({"pad_token": contract.pad_token})
    tokenizer.pad_token = contract.pad_token
    if tokenizer.pad_token_id != contract.pad_id:
      raise errors.DataConfigError(
        f"pad token {contract.pad_token!r} has id {tokenizer.pad_token_id} in this tokenizer, "
        f"but the input contract says {contract.pad_id}: is it the run's tokenizer?"
      )
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    raise errors.DataConfigError(
      f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; jaxpref needs one"
    )
  specials = list(dict.fromkeys((*contract.prefix, *contract.suffix)))
  for token, token_id in specials:
    if tokenizer.convert_tokens_to_ids(token) != token_id:
      raise errors.DataConfigError(
        f"special token {token!r} is not id {token_id} in this tokenizer, as the input "
        "contract says: is it the run's tokenizer?"
      )
  pre = [t for t, _ in contract.prefix]
  suf = [t for t, _ in contract.suffix]
  backend.post_processor = tokenizers.processors.TemplateProcessing(
    single=" ".join([*pre, "$A", *suf]),
    pair=" ".join([*pre, "$A", *suf, "$B:1", *[f"{t}:1" for t in suf]]),
    special_tokens=specials,
  )
  # transformers 5 rebuilds the post-processor from these flags when they are set.
  for flag in ("_add_bos_token", "_add_eos_token"):
    if hasattr(tokenizer, flag):
      object.__setattr__(tokenizer, flag, False)
  if hasattr(tokenizer, "_should_update_post_processor"):
    tokenizer._should_update_post_processor = False
  tokenizer.truncation_side = contract.truncation_side
  tokenizer.padding_side = contract.padding_side
  tokenizer.model_max_length = contract.row_length
  plain = list(tokenizer("a b", add_special_tokens=False)["input_ids"])
  full = list(tokenizer("a b")["input_ids"])
  if full != [*contract.prefix_ids, *plain, *contract.suffix_ids]:
    raise errors.DataConfigError(
      f"the tokenizer does not follow the input contract after configuring it: {full} for "
      f"{contract.describe()}"
    )
  return tokenizer


def save_tokenizer(tokenizer: Any, directory: str | Path, contract: InputContract) -> Path:
  """Saves a configured tokenizer and the contract so transformers 4.50+ and 5 reproduce it.

  `tokenizer_config.json` names the generic `PreTrainedTokenizerFast` (transformers 5 writes
  `TokenizersBackend`, which 4.x lacks) with the tokenizer's `model_input_names`, and has no
  `add_bos_token`/`add_eos_token` (transformers 5 rebuilds the post-processor from them), so
  `tokenizer.json`'s post-processor is what runs.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tokenizer.save_pretrained(str(directory))
  config_path = directory / "tokenizer_config.json"
  config = json.loads(config_path.read_text()) if config_path.is_file() else {}
  for key in ("add_bos_token", "add_eos_token", "backend", "auto_map"):
    config.pop(key, None)
  config |= {
    "tokenizer_class": "PreTrainedTokenizerFast",
    # transformers 4.x's generic class would also return token_type_ids, which decoders reject.
    "model_input_names": list(tokenizer.model_input_names),
    "truncation_side": contract.truncation_side,
    "padding_side": contract.padding_side,
    "model_max_length": contract.row_length,
    "pad_token": contract.pad_token,
  }
  config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
  contract.write(directory)
  return directory


def for_checkpoint(tokenizer: Any, cfg: Any) -> InputContract:
  """The contract of an external Hugging Face checkpoint: what transformers does with it.

  The tokenizer's own special tokens, its truncation side, `min(model_max_length,
  max_position_embeddings)` tokens, and transformers' pooling rule with `config.pad_token_id`.
  """
  prefix_ids, suffix_ids = special_affixes(tokenizer, "tokenizer")
  model_max = getattr(tokenizer, "model_max_length", None) or cfg.max_position_embeddings
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else None
  return InputContract(
    max_length=int(min(model_max, cfg.max_position_embeddings)),
    truncation_side=getattr(tokenizer, "truncation_side", "right"),
    padding_side=getattr(tokenizer, "padding_side", "right"),
    special_tokens="tokenizer",
    prefix=_named(tokenizer, prefix_ids),
    suffix=_named(tokenizer, suffix_ids),
    pad_token=None if pad_id is None else str(tokenizer.convert_ids_to_tokens(int(pad_id))),
    pad_id=pad_id,
    pooling=cfg.pooling,
    pooled_position=_pooled_position(cfg.arch, cfg.pooling, pad_id),
  )


def infer_for_workdir(workdir: str | Path, tokenizer: Any, cfg: Any) -> InputContract:
  """The contract a run written before contracts were stored was trained with (said once).

  Such runs appended EOS (`special_tokens=auto`) and cut on `data.truncation_side` at
  `data.max_length` (from the run's config.json); the pad token is chosen as `configure` does.
  """
  run_config = Path(workdir) / "config.json"
  data = {}
  if run_config.is_file():
    data = json.loads(run_config.read_text()).get("data", {})
  contract = configure(
    tokenizer,
    max_length=int(data.get("max_length", 512)),
    truncation_side=data.get("truncation_side", "left"),
    special_tokens=data.get("special_tokens", "auto"),
    arch=cfg.arch,
    pooling=cfg.pooling,
    vocab_size=cfg.vocab_size,
  )
  key = str(Path(workdir).resolve())
  if key not in _warned_inferred:
    _warned_inferred.add(key)
    logging.warning(
      "%s has no %s (written before jaxpref stored one); inferred from its config.json: %s",
      workdir,
      CONTRACT_FILE,
      contract.describe(),
    )
  return contract


def override(
  contract: InputContract,
  tokenizer: Any,
  *,
  max_length: int | None = None,
  truncation_side: str | None = None,
  padding_side: str | None = None,
  special_tokens: str | None = None,
  arch: str | None = None,
) -> InputContract:
  """`contract` with the parts a user set on the command line changed (None keeps a part).

  `arch` (the model's) lets a switch to `paper_before_eos` refuse a bidirectional model.
  """
  changes: dict[str, Any] = {}
  if max_length:
    changes["max_length"] = int(max_length)
  if truncation_side:
    changes["truncation_side"] = truncation_side
  if padding_side:
    changes["padding_side"] = padding_side
  if special_tokens and special_tokens != contract.special_tokens:
    _check_before_eos(special_tokens, arch, contract.pooling)
    prefix_ids, suffix_ids = special_affixes(tokenizer, special_tokens)
    changes |= {
      "special_tokens": special_tokens,
      "prefix": _named(tokenizer, prefix_ids),
      "suffix": _named(tokenizer, suffix_ids),
    }
  return contract.replace(**changes) if changes else contract
