"""`data.tasks` (train on some of the files' tasks) and the trainer's `on_final_eval` hook."""

from __future__ import annotations

import json

import numpy as np
import pytest
import train_helpers as th

from jaxpref.data.errors import DataConfigError
from jaxpref.evaluation import calibration
from jaxpref.evaluation import evaluator as evaluation
from jaxpref.models import source as model_source
from jaxpref.training import data as train_data
from jaxpref.training import trainer


def _tiny_config(**changes):
  """configs/tiny.py with the few-second overrides of the training tests."""
  return th.tiny_config(lock=False, **changes)


def test_select_tasks_keeps_file_order_and_names_the_key():
  available = ["dsp_academy", "dsp_business", "dsp_literature"]
  assert train_data.select_tasks(available, "") == available
  assert train_data.select_tasks(available, " dsp_literature,dsp_academy ") == [
    "dsp_academy",
    "dsp_literature",
  ]
  with pytest.raises(DataConfigError, match=r"data\.tasks: \['dsp_normal'\] not among"):
    train_data.select_tasks(available, "dsp_academy,dsp_normal")


@pytest.mark.usefixtures("shared_dir")
def test_final_eval_hook_gets_the_reports_of_the_final_params(tmp_path):
  config = _tiny_config(data__tasks="helpful,webgpt")
  calls = []
  result = trainer.train_and_evaluate(config, tmp_path, on_final_eval=calls.append)
  assert len(calls) == 1
  reports = calls[0]
  # data.tasks: only the selected tasks are trained and evaluated, in file order.
  assert list(reports) == ["helpful", "webgpt", "all"]
  assert "task_loss/webgpt" in result and not [k for k in result if "harmless" in k]

  # The logged scalars are the reports' own numbers (one evaluation, not two).
  final = json.loads((tmp_path / "eval_final.json").read_text())
  assert final == {
    f"eval/{task}/{name}": float(report[name])
    for task, report in reports.items()
    for name in evaluation.LOGGED_METRICS
  }

  # Independently: restore the saved final parameters, rebuild the held-out split, score it and
  # bin it; the hook's reliability bins must be those of the trained model.
  cfg, params, _, step = model_source.load_for_inference(workdir=str(tmp_path))
  assert step == config.train.steps
  data = train_data.prepare(config, train_data.load_tokenizer(config))
  for task, items in data.eval_items.items():
    batches = evaluation.tokenized_eval_batches(
      items, data.tokenizer, batch_size=16, max_length=config.data.max_length
    )
    rewards_bn, scores_bn = evaluation.collect_rewards(cfg, params, batches)
    expected = calibration.calibration_report(rewards_bn, scores_bn, n_bootstrap=0)["reliability"]
    got = reports[task]["reliability"]
    assert got["count"] == expected["count"] and sum(got["count"]) > 0
    for key in ("confidence", "frequency"):  # None (NaN here) for an empty bin.
      np.testing.assert_allclose(
        np.asarray(got[key], float), np.asarray(expected[key], float), atol=1e-5
      )

  # A finished run started again with no final evaluation does not call the hook.
  config.eval.final = False
  trainer.train_and_evaluate(config, tmp_path, on_final_eval=calls.append)
  assert len(calls) == 1
