"""Reliability diagrams are real PNG images of the expected size."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from jaxpref.evaluation import calibration, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
  rng = np.random.default_rng(0)
  rewards_bn = rng.normal(scale=1.5, size=(2000, 2)).astype(np.float32)
  prefer_first = rng.random(2000) < 1 / (1 + np.exp(-(rewards_bn[:, 0] - rewards_bn[:, 1])))
  scores_bn = np.stack([prefer_first, ~prefer_first], axis=1).astype(np.float32)
  return calibration.calibration_report(3.0 * rewards_bn, scores_bn, n_bootstrap=0)


def assert_png(path, height, width):
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE
  assert len(data) > 20_000  # bars, text and axes, not an empty canvas
  image = matplotlib.image.imread(path)
  assert image.shape[:2] == (height, width)
  assert image.std() > 0.05  # not a blank image


def test_reliability_diagram_from_a_report(report, tmp_path):
  path = plots.reliability_diagram(report, tmp_path / "sub" / "reliability.png", "a model")
  assert_png(tmp_path / "sub" / "reliability.png", 672, 552)  # 5.6 x 4.6 inches at 120 dpi
  assert path.endswith("reliability.png")


def test_reliability_diagram_from_bins_with_empty_bins(tmp_path):
  bins = {
    "edges": [0.0, 0.25, 0.5, 0.75, 1.0],
    "confidence": [0.1, None, None, 0.9],
    "frequency": [0.3, None, None, 0.7],
    "count": [10, 0, 0, 10],
  }
  plots.reliability_diagram(bins, tmp_path / "bins.png")
  assert_png(tmp_path / "bins.png", 672, 552)


def test_reliability_grid_rows_by_columns(report, tmp_path):
  grid = {"bt": {"hh": report, "shp": report}, "more": {"shp": report["reliability"]}}
  plots.reliability_grid(grid, tmp_path / "grid.png", "models by datasets")
  assert_png(tmp_path / "grid.png", int(round((4.4 * 2 + 0.4) * 120)), int(3.6 * 2 * 120))


def test_reliability_grid_flat(report, tmp_path):
  plots.reliability_grid({"a": report, "b": report, "c": report}, tmp_path / "flat.png", ncols=2)
  assert_png(tmp_path / "flat.png", int(4.4 * 2 * 120), int(3.6 * 2 * 120))


def test_bad_input_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="missing keys"):
    plots.reliability_diagram({"accuracy": 0.5}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="at least one"):
    plots.reliability_grid({}, tmp_path / "x.png")


def test_diagram_is_honest_about_counts(report, tmp_path):
  """A 1-prediction bin is faded, not a full-height bar; n matches the report's n_pairs; the
  legend names every colour drawn, the gap-over-bar overlap included."""
  from matplotlib.figure import Figure

  bins = {
    "edges": [0.0, 0.25, 0.5, 0.75, 1.0],
    "confidence": [0.1, 0.4, 0.6, 0.9],
    "frequency": [0.0, 0.45, 0.55, 1.0],
    "count": [1, 400, 400, 1],
    "ece": 0.05,
  }
  fig = Figure()
  ax_main, ax_hist = fig.subplots(2, 1)
  plots._draw(ax_main, ax_hist, bins, "t")
  _, labels = ax_main.get_legend_handles_labels()
  assert f"frequency, bin with < {plots.MIN_COUNT} predictions" in labels
  assert "gap over the bar (frequency > mean p)" in labels
  heights = {
    round(p.get_x(), 2): p.get_alpha()
    for c in ax_main.containers
    if c.get_label().startswith("frequency")
    for p in c.patches
  }
  assert heights[0.75] < 0.5 and heights[0.25] in (None, 1.0)
  texts = [t.get_text() for t in ax_main.texts]
  assert any("n_pairs = 401 (802 predictions, both orders)" in t for t in texts)
  # On a real report the plotted n is the report's n_pairs.
  fig = Figure()
  ax_main, ax_hist = fig.subplots(2, 1)
  plots._draw(ax_main, ax_hist, plots.as_bins(report), None)
  assert any(f"n_pairs = {report['n_pairs']:,}" in t.get_text() for t in ax_main.texts)
