"""Reading every preference format, and every kind of bad record, with raise and skip."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from jaxpref.data import (
  PAPER_TEMPLATE,
  DataConfigError,
  DataError,
  errors,
  read_many,
  read_preferences,
)
from jaxpref.testing import TOY_CHAT_TEMPLATE, word_tokenizer, write_records

H, A = "\n\nHuman: ", "\n\nAssistant: "


def _conv(*turns: str) -> str:
  return "".join((H if i % 2 == 0 else A) + t for i, t in enumerate(turns))


# ----------------------------------------------------------------------------- good files


def test_text_score_json_list_with_pads_and_partial_ties(tmp_path):
  path = write_records(
    tmp_path / "prefs.json",
    [
      {"text": [_conv("q1", "good"), _conv("q1", "bad"), ""], "score": [1, 0, -1]},
      {"text": [_conv("q2", "x"), _conv("q2", "y"), _conv("q2", "z")], "score": [2.0, 2.0, 0.5]},
    ],
  )
  items, summary = read_preferences(path)
  assert [it.scores for it in items] == [(1.0, 0.0, -1.0), (2.0, 2.0, 0.5)]
  assert items[0].texts[2] == ""
  # The prompt is the shared prefix up to the last assistant marker, not into the responses.
  assert items[0].prompt == H + "q1" + "\n\nAssistant:"
  assert items[1].prompt == H + "q2" + "\n\nAssistant:"
  assert [it.task for it in items] == ["prefs", "prefs"]
  assert [it.index for it in items] == [0, 1] and items[0].source == str(path)
  assert summary.to_dict() == {
    "source": str(path),
    "read": 2,
    "kept": 2,
    "skipped": 0,
    "skipped_by_reason": {},
    "kept_by_task": {"prefs": 2},
    "truncated": 0,
  }


def test_text_score_jsonl_gz_and_explicit_prompt_and_record_task(tmp_path):
  path = write_records(
    tmp_path / "d.jsonl.gz",
    [
      {"text": ["P a", "P b"], "score": [0, 1], "prompt": "P"},
      {"text": ["Q a", "Q b"], "score": [1, 0], "task": "other"},
    ],
  )
  assert gzip.decompress(path.read_bytes())  # Really gzipped.
  items, _ = read_preferences(path)
  assert items[0].prompt == "P" and items[0].task == "d"
  assert items[1].prompt == "Q " and items[1].task == "other"
  assert [it.index for it in items] == [1, 2]  # Line numbers.
  items, _ = read_preferences(path, task="forced")
  assert {it.task for it in items} == {"forced"}


def test_chosen_rejected_strings_prompt_template_and_chat(tmp_path):
  path = write_records(
    tmp_path / "trl.jsonl",
    [
      {"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go away"},
      {"prompt": "Q: hi", "chosen": " A: hello", "rejected": " A: go away"},
    ],
  )
  items, _ = read_preferences(path)
  assert items[0].texts == ("Q: hi A: hello", "Q: hi A: go away")
  assert items[0].prompt == "Q: hi A: "  # Common prefix (no assistant marker to cut at).
  assert items[1].texts == ("Q: hi A: hello", "Q: hi A: go away")  # TRL: prompt + response.
  assert items[1].prompt == "Q: hi" and items[1].scores == (1.0, 0.0)
  items, _ = read_preferences(path, template="<{prompt}>[{response}]")
  assert items[1].texts == ("<Q: hi>[ A: hello]", "<Q: hi>[ A: go away]")
  with pytest.raises(DataConfigError, match="template"):
    read_preferences(path, template="{prompt} only")

  user = {"role": "user", "content": "hi"}
  chat = write_records(
    tmp_path / "chat.json",
    [
      {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go"}],
      },
      {
        "chosen": [user, {"role": "assistant", "content": "hello"}],
        "rejected": [user, {"role": "assistant", "content": "go"}],
      },
    ],
  )
  tok = word_tokenizer(["x"])
  tok.chat_template = TOY_CHAT_TEMPLATE
  items, _ = read_preferences(chat, tokenizer=tok)
  for item in items:
    assert item.texts == ("<user> hi\n<assistant> hello\n", "<user> hi\n<assistant> go\n")
  assert items[0].prompt == items[1].prompt == json.dumps([user], sort_keys=True)
  with pytest.raises(DataConfigError, match="chat template"):
    read_preferences(chat)


def test_hh_rlhf_detected_and_prompt_is_up_to_last_assistant_turn(tmp_path):
  chosen = _conv("q", "a1", "more?", "Sure, here it is")
  rejected = _conv("q", "a1", "more?", "Sure, no")
  path = write_records(tmp_path / "hh.jsonl.gz", [{"chosen": chosen, "rejected": rejected}])
  items, _ = read_preferences(path)
  assert items[0].prompt == _conv("q", "a1", "more?") + "\n\nAssistant:"
  assert items[0].texts == (chosen, rejected) and items[0].task == "hh"
  assert read_preferences(path, format="chosen_rejected")[0][0].prompt == items[0].prompt


def _dsp_record(query, **responses):
  base = {"academy": "A", "business": "B", "entertainment": "E", "literature": "L", "normal": "N"}
  base.update(responses)
  return {"query": query, "responses": base}


def test_domain_specific_pairs_and_ranked_forms(tmp_path):
  path = write_records(tmp_path / "dsp.json", [_dsp_record("q0"), _dsp_record("q1")])
  items, summary = read_preferences(path)
  # The authors' --to_pairs conversion: per domain, the domain's response against each other.
  assert summary.kept == 2 * 4 * 4
  assert summary.kept_by_task == {
    f"dsp_{d}": 8 for d in ("academy", "business", "entertainment", "literature")
  }
  academy = [it for it in items if it.task == "dsp_academy" and it.prompt == "q0"]
  render = lambda r: PAPER_TEMPLATE.format(prompt="q0", response=r)  # noqa: E731
  assert [it.texts for it in academy] == [(render("A"), render(o)) for o in "BELN"]
  assert all(it.scores == (1.0, 0.0) for it in items)

  ranked, _ = read_preferences(path, domain_pairs=False, domains=["business"], task="x")
  assert [it.task for it in ranked] == ["x_business"] * 2
  assert ranked[0].texts == tuple(render(r) for r in "BAELN")
  assert ranked[0].scores == (1.0, 0.0, 0.0, 0.0, 0.0)


def test_domain_specific_bad_pairs_are_dropped_one_by_one(tmp_path):
  path = write_records(
    tmp_path / "dsp.json", [_dsp_record("q", business="A", normal=" "), _dsp_record("ok")]
  )
  with pytest.raises(DataError, match=r"dsp\.json\[record 0\] \(academy vs business\): .*same"):
    read_preferences(path)
  items, summary = read_preferences(path, on_error="skip")
  # academy==business: academy-vs-business and business-vs-academy; normal empty: 4 pairs.
  assert summary.skipped_by_reason == {"duplicate_text": 2, "empty_text": 4}
  assert summary.kept == 32 - 6 and len(items) == 26
  with pytest.raises(DataError, match="no 'music'"):
    read_preferences(path, domains=["music"])


def test_auto_detection_failure_and_empty_file(tmp_path):
  with pytest.raises(DataError, match="cannot detect the format"):
    read_preferences(write_records(tmp_path / "x.json", [{"a": 1}, [1, 2]]))
  items, summary = read_preferences(write_records(tmp_path / "e.json", []))
  assert items == [] and summary.read == 0
  with pytest.raises(FileNotFoundError):
    read_preferences(tmp_path / "missing.json")
  with pytest.raises(DataConfigError, match="on_error"):
    read_preferences(tmp_path / "e.json", on_error="ignore")


# ----------------------------------------------------------------------------- bad records

GOOD = {"text": ["p a", "p b"], "score": [1, 0]}
BAD_RECORDS = [
  ('{"text": ["p a", "p b"], "score": [1, 0]', "invalid_json"),
  ({"text": ["p a", "p b"], "score": [1]}, "length_mismatch"),
  ('{"text": ["p a", "p b"], "score": [NaN, 0]}', "non_finite_score"),
  ('{"text": ["p a", "p b"], "score": [1, -Infinity]}', "non_finite_score"),
  ({"text": ["p a"], "score": [1]}, "too_few_responses"),
  ({"text": ["p a", ""], "score": [1, -1]}, "too_few_responses"),
  ({"text": ["p a", "  "], "score": [1, 0]}, "empty_text"),
  ({"text": ["p a", "p b"], "score": [1, 1]}, "no_preference"),
  ({"text": ["p a", "p a"], "score": [1, 0]}, "duplicate_text"),
  ({"text": ["p a", "p b"], "score": ["1", 0]}, "wrong_type"),
  ({"text": ["p a", "p b"], "score": [True, 0]}, "wrong_type"),
  ({"text": "p a", "score": [1, 0]}, "wrong_type"),
  ({"text": ["p a", 3], "score": [1, 0]}, "wrong_type"),
  ([1, 2], "wrong_type"),
  ({"text": ["p a", "p b"]}, "missing_key"),
]


@pytest.mark.parametrize("record,reason", BAD_RECORDS, ids=[r for _, r in BAD_RECORDS])
def test_bad_record_raises_one_line_error_naming_file_and_line(tmp_path, record, reason):
  path = write_records(tmp_path / "bad.jsonl", [GOOD, record, GOOD], layout="lines")
  with pytest.raises(DataError) as info:
    read_preferences(path, format="text_score")
  message = str(info.value)
  assert message.startswith(f"{path}:2: ") and "\n" not in message
  assert info.value.reason == reason and f"[{reason};" in message
  items, summary = read_preferences(path, format="text_score", on_error="skip")
  assert len(items) == 2 and [it.index for it in items] == [1, 3]
  assert summary.read == 3 and summary.skipped_by_reason == {reason: 1}


def test_json_list_bad_record_names_record_index(tmp_path):
  path = write_records(tmp_path / "bad.json", [GOOD, GOOD, {"text": ["p a"], "score": [1]}])
  with pytest.raises(DataError, match=r"bad\.json\[record 2\]: 1 response"):
    read_preferences(path)


def test_broken_json_list_cannot_be_skipped_and_names_line_and_column(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[\n {"text": ["a", "b"], "score": [1, 0]},\n {"text": ["a" "b"]}\n]\n')
  for on_error in ("raise", "skip"):
    with pytest.raises(DataError, match=r"broken\.json:3:\d+: invalid JSON"):
      read_preferences(path, on_error=on_error)


def test_all_bad_kinds_in_one_file_are_counted_by_reason(tmp_path):
  records = [GOOD] + [r for r, _ in BAD_RECORDS] + [GOOD]
  path = write_records(tmp_path / "mixed.jsonl", records, layout="lines")
  items, summary = read_preferences(path, format="text_score", on_error="skip")
  expected = {}
  for _, reason in BAD_RECORDS:
    expected[reason] = expected.get(reason, 0) + 1
  assert summary.skipped_by_reason == expected
  assert summary.read == len(records) and summary.kept == len(items) == 2
  assert summary.skipped + summary.kept == summary.read


def test_ties_policy(tmp_path):
  path = write_records(tmp_path / "t.json", [GOOD, {"text": ["p a", "p b"], "score": [1, 1]}])
  with pytest.raises(DataError, match="on_tie='skip'"):
    read_preferences(path)
  items, summary = read_preferences(path, on_tie="skip")
  assert len(items) == 1 and summary.skipped_by_reason == {"no_preference": 1}
  items, summary = read_preferences(path, on_tie="keep")
  assert len(items) == 2 and items[1].scores == (1.0, 1.0) and summary.skipped == 0
  # Other errors still raise when only ties are skipped.
  bad = write_records(tmp_path / "b.json", [{"text": ["p a", "p b"], "score": [1]}])
  with pytest.raises(DataError, match="length_mismatch"):
    read_preferences(bad, on_tie="skip")


def test_read_many_merges_summaries(tmp_path):
  a = write_records(tmp_path / "a.json", [GOOD])
  b = write_records(tmp_path / "b.jsonl", [GOOD, "nope"], layout="lines")
  items, summary = read_many([a, b], on_error="skip")
  assert len(items) == 2 and summary.read == 3
  assert summary.skipped_by_reason == {"invalid_json": 1}
  assert summary.kept_by_task == {"a": 1, "b": 1}


# ----------------------------------------------------------------------------- real files


def test_real_text_score_files(preferences_dir):
  for name, count in (("helpful", 2352), ("harmless", 2312)):
    items, summary = read_preferences(preferences_dir / f"{name}.json")
    assert summary.kept == summary.read == count and summary.skipped == 0
    assert all(it.scores == (1.0, 0.0) and it.prompt.endswith("\n\nAssistant:") for it in items)
    assert all(
      it.texts[0].startswith(it.prompt) and it.texts[1].startswith(it.prompt) for it in items
    )


def test_real_webgpt_ties(preferences_dir):
  raw = json.loads((preferences_dir / "webgpt.json").read_text())
  ties = sum(1 for r in raw if r["score"][0] == r["score"][1])
  assert ties == 245
  with pytest.raises(DataError, match=r"webgpt\.json\[record \d+\]: no strict preference"):
    read_preferences(preferences_dir / "webgpt.json")
  items, summary = read_preferences(preferences_dir / "webgpt.json", on_tie="skip")
  assert summary.skipped_by_reason == {"no_preference": ties}
  assert len(items) == len(raw) - ties == 656
  assert all(it.prompt.endswith("## Assistant:\n") for it in items)


def test_real_domain_specific_counts_match_an_independent_count(preferences_dir):
  raw = json.loads((preferences_dir / "domain_specific.json").read_text())
  expected_kept, expected_skip = {}, {}
  for rec in raw:
    resp = rec["responses"]
    for d in ("academy", "business", "entertainment", "literature"):
      for other in resp:
        if other == d:
          continue
        if not resp[d].strip() or not resp[other].strip():
          expected_skip["empty_text"] = expected_skip.get("empty_text", 0) + 1
        elif resp[d] == resp[other]:
          expected_skip["duplicate_text"] = expected_skip.get("duplicate_text", 0) + 1
        else:
          expected_kept[f"dsp_{d}"] = expected_kept.get(f"dsp_{d}", 0) + 1
  items, summary = read_preferences(preferences_dir / "domain_specific.json", on_error="skip")
  assert summary.read == len(raw) == 661
  assert summary.kept_by_task == expected_kept and summary.skipped_by_reason == expected_skip
  assert len(items) == sum(expected_kept.values())


def test_real_hh_rlhf_raw_matches_text_score_file(preferences_dir):
  raw_items, summary = read_preferences(preferences_dir / "hh-rlhf" / "harmless-base-test.jsonl.gz")
  assert summary.kept == 2312
  ts_items, _ = read_preferences(preferences_dir / "harmless.json")
  assert [it.texts for it in raw_items] == [it.texts for it in ts_items]
  assert [it.prompt for it in raw_items] == [it.prompt for it in ts_items]
  assert raw_items[0].index == 1 and raw_items[-1].index == 2312


def test_error_message_is_one_line_even_for_multiline_content(tmp_path):
  path = write_records(tmp_path / "m.json", [{"text": ["a\nb", "c\nd"], "score": [1, math.inf]}])
  with pytest.raises(DataError) as info:
    read_preferences(path)
  assert "\n" not in str(info.value) and info.value.reason == errors.NON_FINITE_SCORE
