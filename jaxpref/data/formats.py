"""Record formats: each turns one parsed JSON record into candidate preference items.

A parser checks the record's structure (keys, types) and raises `RecordError` for the whole
record; the reader then validates every candidate it returns (scores, empty texts, ties) with
`validate_candidate`, so one bad pair of a domain-specific record drops only that pair.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from collections.abc import Callable, Sequence
from typing import Any

from jaxpref.data import errors

FORMATS = ("text_score", "chosen_rejected", "hh_rlhf", "domain_specific")
# The template the paper's authors used to render domain-specific data (and WebGPT).
PAPER_TEMPLATE = "## Human:\n{prompt}\n\n## Assistant:\n{response}"
# TRL's convention for `prompt` + `chosen`/`rejected` strings: plain concatenation.
TRL_TEMPLATE = "{prompt}{response}"
DSP_DOMAINS = ("academy", "business", "entertainment", "literature")
# A shared prefix is cut just after the last of these, so that two items with the same prompt get
# the same key even when their responses happen to start alike.
_ASSISTANT_MARKERS = ("\n\nAssistant:", "## Assistant:\n")


class RecordError(Exception):
  """A record (or one derived item) is bad; the reader adds the location."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class Candidate:
  """An item before validation; `label` names it within its record (e.g. `academy vs normal`)."""

  texts: tuple[Any, ...]
  scores: tuple[Any, ...]
  prompt: str
  task: str
  label: str = ""


@dataclasses.dataclass(frozen=True)
class FormatOptions:
  """What a parser needs besides the record.

  Attributes:
    task: task name of the items (domain-specific: the prefix of `<task>_<domain>`).
    template: joins `prompt` and a response (`{prompt}`, `{response}`); None: format default.
    tokenizer: renders chat-message lists with its chat template.
    domains: the domains that each become a task (domain-specific format).
    domain_pairs: domain-specific records become pairs (the authors' `--to_pairs` conversion)
      rather than one item with all responses.
  """

  task: str
  template: str | None = None
  tokenizer: Any = None
  domains: Sequence[str] | None = None
  domain_pairs: bool = True


def check_template(template: str) -> None:
  fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
  if fields != {"prompt", "response"}:
    raise errors.DataConfigError(
      f"template {template!r} must contain exactly the fields {{prompt}} and {{response}}, "
      f"found {sorted(fields)}"
    )


def detect_format(record: Any) -> str | None:
  """The format a record looks like, or None when it has none of the known key sets."""
  if not isinstance(record, dict):
    return None
  if "text" in record and "score" in record:
    return "text_score"
  if "query" in record and "responses" in record:
    return "domain_specific"
  if "chosen" in record and "rejected" in record:
    chosen = record["chosen"]
    if (
      "prompt" not in record
      and isinstance(chosen, str)
      and chosen.lstrip().startswith("Human:")
      and "\n\nAssistant:" in chosen
    ):
      return "hh_rlhf"
    return "chosen_rejected"
  return None


def shared_prompt(texts: Sequence[str]) -> str:
  """The common prefix of `texts`, cut after its last assistant marker when it has one."""
  prefix = texts[0]
  for text in texts[1:]:
    n = min(len(prefix), len(text))
    i = 0
    while i < n and prefix[i] == text[i]:
      i += 1
    prefix = prefix[:i]
  cut = max((prefix.rfind(m) + len(m) for m in _ASSISTANT_MARKERS if m in prefix), default=-1)
  return prefix[:cut] if cut >= 0 else prefix


def _require_dict(record: Any, keys: Sequence[str]) -> dict[str, Any]:
  if not isinstance(record, dict):
    raise RecordError(errors.WRONG_TYPE, f"expected a JSON object, got {type(record).__name__}")
  missing = [k for k in keys if k not in record]
  if missing:
    raise RecordError(errors.MISSING_KEY, f"missing key {missing[0]!r} (has {sorted(record)[:8]})")
  return record


def _require_str(value: Any, name: str) -> str:
  if not isinstance(value, str):
    raise RecordError(errors.WRONG_TYPE, f"{name} must be a string, got {type(value).__name__}")
  return value


def parse_text_score(record: Any, opts: FormatOptions) -> list[Candidate]:
  rec = _require_dict(record, ("text", "score"))
  texts, scores = rec["text"], rec["score"]
  for name, value in (("text", texts), ("score", scores)):
    if not isinstance(value, list):
      raise RecordError(errors.WRONG_TYPE, f"{name} must be a list, got {type(value).__name__}")
  if len(texts) != len(scores):
    raise RecordError(errors.LENGTH_MISMATCH, f"{len(texts)} texts but {len(scores)} scores")
  prompt = rec.get("prompt")
  if prompt is not None:
    prompt = _require_str(prompt, "prompt")
  else:
    real = [t for t, s in zip(texts, scores) if isinstance(t, str) and _is_real(s)]
    prompt = shared_prompt(real) if real else ""
  return [Candidate(tuple(texts), tuple(scores), prompt, opts.task)]


def _is_real(score: Any) -> bool:
  return isinstance(score, int | float) and not isinstance(score, bool) and score >= 0


def _check_messages(value: Any, name: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise RecordError(errors.WRONG_TYPE, f"{name} must be a non-empty list of messages")
  for i, msg in enumerate(value):
    if not (
      isinstance(msg, dict)
      and isinstance(msg.get("role"), str)
      and isinstance(msg.get("content"), str)
    ):
      raise RecordError(
        errors.WRONG_TYPE, f"{name}[{i}] must be a {{'role': str, 'content': str}} message"
      )
  return value


def _render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    raise errors.DataConfigError(
      "records with chat-message lists need a tokenizer with a chat template "
      "(pass tokenizer=, or give prompt/chosen/rejected as strings with a template)"
    )
  import jinja2

  try:
    return tokenizer.apply_chat_template(messages, tokenize=False)
  except (jinja2.TemplateSyntaxError, jinja2.exceptions.SecurityError) as e:
    # The template itself is broken or unsafe (the sandbox refused it): no record will render.
    raise errors.DataConfigError(
      f"the tokenizer's chat template cannot run ({type(e).__name__}: {e})"
    ) from None
  except jinja2.TemplateError as e:
    # The template refused these messages (`raise_exception(...)`, e.g. roles must alternate).
    raise RecordError(errors.WRONG_TYPE, f"the chat template refused the messages: {e}") from None


def parse_chosen_rejected(record: Any, opts: FormatOptions) -> list[Candidate]:
  rec = _require_dict(record, ("chosen", "rejected"))
  chosen, rejected, prompt = rec["chosen"], rec["rejected"], rec.get("prompt")
  if isinstance(chosen, list) or isinstance(rejected, list):
    chosen = _check_messages(chosen, "chosen")
    rejected = _check_messages(rejected, "rejected")
    if prompt is None:  # Implicit prompt: the messages both conversations share.
      n = 0
      while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
      prompt_msgs, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
      prompt_msgs = _check_messages(prompt, "prompt")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
      if not msgs or not any(m["content"].strip() for m in msgs):
        raise RecordError(errors.EMPTY_TEXT, f"{name} has no response text")
    texts = (
      _render_chat(opts.tokenizer, prompt_msgs + chosen),
      _render_chat(opts.tokenizer, prompt_msgs + rejected),
    )
    return [Candidate(texts, (1.0, 0.0), json.dumps(prompt_msgs, sort_keys=True), opts.task)]
  chosen = _require_str(chosen, "chosen")
  rejected = _require_str(rejected, "rejected")
  if prompt is None:
    return [Candidate((chosen, rejected), (1.0, 0.0), shared_prompt([chosen, rejected]), opts.task)]
  prompt = _require_str(prompt, "prompt")
  template = opts.template or TRL_TEMPLATE
  for name, response in (("chosen", chosen), ("rejected", rejected)):
    if not response.strip():
      raise RecordError(errors.EMPTY_TEXT, f"{name} is empty")
  texts = tuple(template.format(prompt=prompt, response=r) for r in (chosen, rejected))
  return [Candidate(texts, (1.0, 0.0), prompt, opts.task)]


def parse_hh_rlhf(record: Any, opts: FormatOptions) -> list[Candidate]:
  rec = _require_dict(record, ("chosen", "rejected"))
  chosen = _require_str(rec["chosen"], "chosen")
  rejected = _require_str(rec["rejected"], "rejected")
  return [Candidate((chosen, rejected), (1.0, 0.0), shared_prompt([chosen, rejected]), opts.task)]


def parse_domain_specific(record: Any, opts: FormatOptions) -> list[Candidate]:
  """One task per chosen domain; that domain's response beats every other response.

  With `domain_pairs` (default, the authors' `reward_datasets.py --convert --to_pairs`), each
  record gives, per domain, one pair (domain response, other response) with scores (1, 0) for
  every other response of the record, `normal` included; otherwise one item holding all the
  responses with score 1 for the domain and 0 for the rest.
  """
  rec = _require_dict(record, ("query", "responses"))
  query = _require_str(rec["query"], "query")
  if not query.strip():
    raise RecordError(errors.EMPTY_TEXT, "query is empty")
  responses = rec["responses"]
  if not isinstance(responses, dict):
    raise RecordError(
      errors.WRONG_TYPE,
      f"responses must be an object of domain -> text, got {type(responses).__name__}",
    )
  for style, text in responses.items():
    _require_str(text, f"responses[{style!r}]")
  domains = tuple(opts.domains) if opts.domains else DSP_DOMAINS
  for domain in domains:
    if domain not in responses:
      raise RecordError(
        errors.MISSING_KEY, f"responses has no {domain!r} (has {sorted(responses)})"
      )
  if len(responses) < 2:
    raise RecordError(errors.TOO_FEW_RESPONSES, f"{len(responses)} response(s); need 2")
  template = opts.template or PAPER_TEMPLATE
  rendered = {
    style: template.format(prompt=query, response=text) for style, text in responses.items()
  }
  empty = {style for style, text in responses.items() if not text.strip()}
  out = []
  for domain in domains:
    task = f"{opts.task}_{domain}"
    if opts.domain_pairs:
      for style in responses:
        if style == domain:
          continue
        # Render empty responses as "" so validation names them instead of seeing the template.
        texts = tuple("" if s in empty else rendered[s] for s in (domain, style))
        out.append(Candidate(texts, (1.0, 0.0), query, task, f"{domain} vs {style}"))
    else:
      styles = [domain] + [s for s in responses if s != domain]
      texts = tuple("" if s in empty else rendered[s] for s in styles)
      scores = (1.0,) + (0.0,) * (len(styles) - 1)
      out.append(Candidate(texts, scores, query, task, domain))
  return out


PARSERS: dict[str, Callable[[Any, FormatOptions], list[Candidate]]] = {
  "text_score": parse_text_score,
  "chosen_rejected": parse_chosen_rejected,
  "hh_rlhf": parse_hh_rlhf,
  "domain_specific": parse_domain_specific,
}


def validate_candidate(
  cand: Candidate, *, allow_ties: bool = False
) -> tuple[tuple[str, ...], tuple[float, ...]]:
  """Checks texts and scores; returns them as strings and floats, or raises `RecordError`.

  Responses with a score < 0 are padding: their text may be empty and they are never compared.
  The real responses must number at least two, be non-empty, and (unless `allow_ties`) hold at
  least one strict preference; two real responses with the same text but different scores
  contradict each other.
  """
  if len(cand.texts) != len(cand.scores):
    raise RecordError(
      errors.LENGTH_MISMATCH, f"{len(cand.texts)} texts but {len(cand.scores)} scores"
    )
  scores = []
  for i, s in enumerate(cand.scores):
    if isinstance(s, bool) or not isinstance(s, int | float):
      raise RecordError(errors.WRONG_TYPE, f"score[{i}] must be a number, got {s!r}")
    if not math.isfinite(s):
      raise RecordError(errors.NON_FINITE_SCORE, f"score[{i}] is {s}")
    scores.append(float(s))
  for i, t in enumerate(cand.texts):
    if not isinstance(t, str):
      raise RecordError(errors.WRONG_TYPE, f"text[{i}] must be a string, got {type(t).__name__}")
  real = [i for i, s in enumerate(scores) if s >= 0]
  if len(real) < 2:
    raise RecordError(
      errors.TOO_FEW_RESPONSES, f"{len(real)} response(s) with a score >= 0; need at least 2"
    )
  for i in real:
    if not cand.texts[i].strip():
      raise RecordError(errors.EMPTY_TEXT, f"text[{i}] is empty")
  seen: dict[str, int] = {}
  for i in real:
    j = seen.setdefault(cand.texts[i], i)
    if j != i and scores[j] != scores[i]:
      raise RecordError(
        errors.DUPLICATE_TEXT,
        f"text[{j}] and text[{i}] are the same text but scored {scores[j]:g} and {scores[i]:g}",
      )
  if not allow_ties and len({scores[i] for i in real}) < 2:
    raise RecordError(
      errors.NO_PREFERENCE,
      f"no strict preference: all {len(real)} responses scored {scores[real[0]]:g}",
    )
  return tuple(cand.texts), tuple(scores)
