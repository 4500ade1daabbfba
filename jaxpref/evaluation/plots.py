"""Reliability diagrams of pairwise preference probabilities (PNG, matplotlib).

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot, so nothing here
changes the caller's global backend or leaks figures in a long-running process or notebook; PNGs
are rendered by the Agg canvas.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_BAR = "#4C72B0"
_GAP = "#DD5555"
_GAP_ALPHA = 0.35
# Bins holding fewer predictions than this are drawn faded: their frequency is mostly noise (one
# prediction gives a frequency of exactly 0 or 1), which a full-height bar would hide.
MIN_COUNT = 10


def _blend(top: str, bottom: str, alpha: float) -> tuple[float, float, float]:
  """The colour of `top` drawn with `alpha` over `bottom` (for the legend's overlap swatch)."""
  from matplotlib import colors

  t, b = np.array(colors.to_rgb(top)), np.array(colors.to_rgb(bottom))
  return tuple(alpha * t + (1 - alpha) * b)


def as_bins(report_or_bins: Mapping[str, Any]) -> Mapping[str, Any]:
  """The per-bin data of a `calibration_report` (its "reliability" entry) or the data itself."""
  if "reliability" in report_or_bins:
    report_or_bins = report_or_bins["reliability"]
  missing = {"edges", "confidence", "frequency", "count"} - set(report_or_bins)
  if missing:
    raise ValueError(
      f"expected a calibration report or its 'reliability' bins; missing keys {sorted(missing)}"
    )
  return report_or_bins


def _floats(values: Any) -> np.ndarray:
  return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _draw(
  ax_main: Axes, ax_hist: Axes, bins: Mapping[str, Any], title: str | None, legend: bool = True
) -> None:
  edges = _floats(bins["edges"])
  confidence, frequency = _floats(bins["confidence"]), _floats(bins["frequency"])
  count = _floats(bins["count"])
  left, width = edges[:-1], np.diff(edges)
  filled = count > 0
  sparse = filled & (count < MIN_COUNT)
  solid = filled & ~sparse
  for mask, alpha, label in (
    (solid, 1.0, "frequency (y = 1)"),
    (sparse, 0.3, f"frequency, bin with < {MIN_COUNT} predictions"),
  ):
    if not mask.any():
      continue
    ax_main.bar(
      left[mask],
      frequency[mask],
      width[mask],
      align="edge",
      color=_BAR,
      alpha=alpha,
      edgecolor="black",
      linewidth=0.6,
      label=label,
    )
  # The gap between what the model predicted on average in a bin and what happened.
  gap_bottom = np.minimum(frequency, confidence)[filled]
  gap_height = np.abs(confidence - frequency)[filled]
  ax_main.bar(
    left[filled],
    gap_height,
    width[filled],
    bottom=gap_bottom,
    align="edge",
    color=_GAP,
    alpha=_GAP_ALPHA,
    edgecolor=_GAP,
    hatch="//",
    linewidth=0.6,
    label="gap |mean p - frequency|",
  )
  if (solid & (frequency > confidence)).any():
    # Where the frequency bar is above mean p, the gap is drawn over the bar: a third colour.
    ax_main.bar(
      [np.nan],
      [np.nan],
      color=_blend(_GAP, _BAR, _GAP_ALPHA),
      edgecolor=_GAP,
      hatch="//",
      label="gap over the bar (frequency > mean p)",
    )
  ax_main.plot([0, 1], [0, 1], "--", color="gray", linewidth=1.0, label="perfect calibration")
  ax_main.plot(
    confidence[filled], frequency[filled], "o", color="black", markersize=3, label="(mean p, freq)"
  )
  ax_main.set(xlim=(0, 1), ylim=(0, 1), ylabel="frequency of y = 1")
  ax_main.tick_params(labelbottom=False)
  if legend:
    ax_main.legend(loc="upper left", fontsize=7, frameon=False)
  total = int(np.nansum(count))
  # Each pair is binned twice (both orders), so the predictions are twice the report's n_pairs.
  notes = [f"n_pairs = {total // 2:,} ({total:,} predictions, both orders)"]
  if bins.get("ece") is not None:
    notes.insert(0, f"ECE = {bins['ece']:.4f}")
  ax_main.text(
    0.97,
    0.04,
    "\n".join(notes),
    transform=ax_main.transAxes,
    ha="right",
    va="bottom",
    fontsize=8,
    bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
  )
  if title:
    ax_main.set_title(title, fontsize=9)
  share = count / max(total, 1)
  ax_hist.bar(left, share, width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
  for x, w, c, h in zip(left, width, count, share):
    if c > 0:  # The count itself, so a sparse bin is visibly sparse.
      ax_hist.text(x + w / 2, h, f"{int(c)}", ha="center", va="bottom", fontsize=5)
  ax_hist.set(xlim=(0, 1), xlabel="confidence p = sigmoid(r_i - r_j)", ylabel="share")
  ax_hist.set_ylim(0, max(float(np.nanmax(share, initial=0.0)) * 1.15, 1e-3))


def _save(fig: Figure, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format="png", dpi=120)
  return path


def reliability_diagram(
  report_or_bins: Mapping[str, Any], path: str | os.PathLike, title: str | None = None
) -> str:
  """Writes a reliability diagram PNG: frequency vs confidence per bin over a histogram.

  Args:
    report_or_bins: a `jaxpref.evaluation.calibration.calibration_report` dict or its
      "reliability" entry
      ({"edges", "confidence", "frequency", "count"[, "ece"]}).
    path: the PNG to write (parent folders are created).
    title: optional title above the diagram.

  Returns:
    The path written.
  """
  bins = as_bins(report_or_bins)
  fig = Figure(figsize=(4.6, 5.6), layout="constrained")
  ax_main, ax_hist = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
  _draw(ax_main, ax_hist, bins, title)
  return _save(fig, path)


def _is_cell(value: Any) -> bool:
  return isinstance(value, Mapping) and ("reliability" in value or "confidence" in value)


def reliability_grid(
  grid: Mapping[str, Any],
  path: str | os.PathLike,
  title: str | None = None,
  *,
  ncols: int | None = None,
) -> str:
  """Writes several reliability diagrams side by side in one PNG.

  Args:
    grid: either {panel name: report_or_bins} (laid out in rows of `ncols`) or
      {row name: {column name: report_or_bins}}, e.g. models by datasets; missing cells are left
      blank.
    path: the PNG to write.
    title: optional figure title.
    ncols: panels per row for a flat mapping (default: up to 4).

  Returns:
    The path written.
  """
  if not grid:
    raise ValueError("reliability_grid needs at least one report")
  if all(_is_cell(v) for v in grid.values()):
    names = list(grid)
    ncols = ncols or min(len(names), 4)
    cells = {(k // ncols, k % ncols): (name, grid[name]) for k, name in enumerate(names)}
    nrows = math.ceil(len(names) / ncols)
  else:
    columns = list(dict.fromkeys(col for row in grid.values() for col in row))
    ncols, nrows = len(columns), len(grid)
    cells = {
      (r, c): (f"{row_name} / {col_name}", row[col_name])
      for r, (row_name, row) in enumerate(grid.items())
      for c, col_name in enumerate(columns)
      if col_name in row
    }
  fig = Figure(figsize=(3.6 * ncols, 4.4 * nrows + (0.4 if title else 0)), layout="constrained")
  specs = fig.add_gridspec(2 * nrows, ncols, height_ratios=(3, 1) * nrows)
  for (r, c), (name, report_or_bins) in cells.items():
    ax_main = fig.add_subplot(specs[2 * r, c])
    ax_hist = fig.add_subplot(specs[2 * r + 1, c], sharex=ax_main)
    # One legend is enough for a grid of identical panels.
    _draw(ax_main, ax_hist, as_bins(report_or_bins), name, legend=(r, c) == min(cells))
  if title:
    fig.suptitle(title)
  return _save(fig, path)
