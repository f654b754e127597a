"""The evaluation report: one self-contained HTML page, and its figures as PNG files.

Why one self-contained page: users open it after every run from wherever it lands (the store, an
MLflow artifact, a mail attachment, a machine with no network), so it needs nothing else: CSS inline,
no JavaScript, every figure and image a base64 ``data:`` URI, no external request at all. And since
the prompts come from LLMs and users, every text is escaped (``html.escape``) before it is written.

What it shows (input: the eval folder, ``results.json`` as documented in the eval phase; images
under ``images/<variant slug>/``):

- a header: benchmark, variants, number of prompts (per skill), confidence level, metrics with their
  conventions;
- per metric: a grouped bar chart (groups: the skills and "all"; one bar per variant, the
  confidence interval as error bars), a table of means with intervals, and a table of paired
  differences vs the baseline (difference, interval, p-value; an interval that excludes 0 is
  highlighted, with its sign, green when the variant is better, red when worse);
- per skill: an image grid of sample prompts (the first ``samples_per_skill`` prompt ids, sorted, so
  the same prompts every run), one row per prompt with its text above, one column per variant, each
  cell the thumbnail and its scores.

Every chart and table names the metric's label and its convention (``results["metrics"]``): a DSG
figure under the official per-item rule is not comparable to one pooled over questions, so a number
is never shown without the rule that made it.

Gaps are shown, not fatal: a metric scored on some variants only (e.g. on base) has bars and cells
for those; a variant with no summary entry falls back to the plain mean of its per-prompt scores
(marked "no interval"); a missing or unreadable image is a placeholder cell saying "image missing".

The same figures are written as PNG files (``figures/<metric>.png``, ``figures/samples_<skill>.png``),
drawn with matplotlib's Agg canvas (never pyplot: no global state, no display). Output is
deterministic: the same input gives the same bytes (no dates; PNG metadata dropped; fixed rc
settings, so a user's matplotlibrc does not change the figures).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from selma_core.errors import InputError

__all__ = ["ReportFiles", "write_report"]

ALL = "all"
BASELINE = "base"
_DPI = 110  # bar charts: crisp on screen at their natural size
_GRID_DPI = 100  # sample grids: one thumbnail pixel per figure pixel
_JPEG_QUALITY = 85  # thumbnails are photos: JPEG keeps the page small (hundreds of them)
# Fixed rc settings: the figures look (and hash) the same whatever the user's matplotlibrc says.
_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 11,
    "axes.labelsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.edgecolor": "#555555",
    "axes.linewidth": 0.8,
    "text.color": "#1d2327",
    "axes.labelcolor": "#1d2327",
    "xtick.color": "#333333",
    "ytick.color": "#333333",
    "text.parse_math": False,  # prompts and names with "$" are text, not mathtext
    "text.usetex": False,
    "svg.hashsalt": "selma",
    "path.simplify": True,
}
_BASE_COLOR = "#9aa0a6"
_MERGED_COLOR = "#d1495b"
# Experts: 16 distinguishable colours (none grey or red: those are base and merged), then they repeat.
_EXPERT_COLORS = (
    "#2e86ab", "#f18f01", "#3b8b5a", "#7b5ea7", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#1b3a6b", "#f6c85f", "#9dd866", "#c5b0d5", "#c49c94", "#6f4e7c", "#0b84a5", "#ffa056",
)  # fmt: skip


class ReportFiles(TypedDict):
    html: Path
    figures: list[Path]


@dataclass(frozen=True)
class _Metric:
    key: str
    label: str
    higher_is_better: bool
    scale: str | None
    convention: str | None

    @property
    def bounds(self) -> str | None:
        """ "0-1" or "0-100" when the scale ends with that range (the scales are phrases: "P(yes), 0-1",
        "100·max(cos, 0), torchmetrics' scale, 0-100"), else None."""
        for bounds in ("0-100", "0-1"):
            if self.scale and self.scale.rstrip(")").endswith(bounds):
                return bounds
        return None

    @property
    def conventions(self) -> str:
        """One line: what the numbers mean (shown under every chart and table of this metric)."""
        parts = [f"convention: {self.convention}"] if self.convention else []
        if self.scale:
            parts.append(f"scale {self.scale}")
        parts.append("higher is better" if self.higher_is_better else "lower is better")
        return " · ".join(parts)

    def fmt(self, value: float | None, signed: bool = False) -> str:
        """A value with as many decimals as its scale warrants (0-1: 3; 0-100: 2)."""
        if value is None or not math.isfinite(value):
            return "—"
        if self.bounds == "0-1":
            digits = 3
        elif self.bounds == "0-100":
            digits = 2
        else:
            magnitude = abs(value)
            digits = 1 if magnitude >= 100 else 2 if magnitude >= 1 else 3
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


@dataclass(frozen=True)
class _Stat:
    mean: float
    low: float | None
    high: float | None
    n: int | None

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None


@dataclass
class _Cell:
    thumb: Any  # PIL.Image.Image or None
    jpeg: bytes | None
    missing: str  # why there is no image ("" when there is one)
    scores: dict[str, float]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    """A file-name and HTML-id safe form of a name (metric keys and skills come from configuration)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def _variant_slug(variant: str) -> str:
    return variant.replace(":", "_")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _p_text(p: float | None) -> str:
    if p is None:
        return "p —"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _confidence_text(confidence: Any) -> str:
    value = _number(confidence)
    if value is None:
        return "CI"
    return f"{value * 100:g}% CI"


def _alpha(confidence: Any) -> float:
    """The significance level that goes with a confidence level (0.95 -> 0.05; unknown: 0.05)."""
    value = _number(confidence)
    return 1.0 - value if value is not None and 0.0 < value < 1.0 else 0.05


def _alpha_text(confidence: Any) -> str:
    return f"{_alpha(confidence):g}"


# ---------------------------------------------------------------------------------------------------
# Reading results.json


def _ordered(declared: Any, seen: Sequence[str], what: str) -> list[str]:
    """The declared order, then anything the rows name that it does not (sorted): nothing is dropped."""
    if not isinstance(declared, list) or not all(isinstance(x, str) for x in declared):
        raise InputError(f"results.json: {what} must be a list of names, got {declared!r:.120}")
    extra = sorted(set(seen) - set(declared))
    return list(dict.fromkeys(declared)) + extra


def _read_metrics(results: Mapping[str, Any]) -> list[_Metric]:
    metrics = results.get("metrics")
    if not isinstance(metrics, Mapping):
        raise InputError("results.json: 'metrics' must map each metric to its label and conventions")
    out = []
    for key, spec in metrics.items():
        spec = spec if isinstance(spec, Mapping) else {}
        out.append(
            _Metric(
                key=str(key),
                label=str(spec.get("label") or key),
                higher_is_better=bool(spec.get("higher_is_better", True)),
                scale=str(spec["scale"]) if spec.get("scale") is not None else None,
                convention=str(spec["convention"]) if spec.get("convention") is not None else None,
            )
        )
    return out


def _dig(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None where a level is missing or not a mapping (results.json is data)."""
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _stat_from(entry: Any) -> _Stat | None:
    if not isinstance(entry, Mapping):
        return None
    mean = _number(entry.get("mean"))
    if mean is None:
        return None
    low, high = _number(entry.get("low")), _number(entry.get("high"))
    n = entry.get("n")
    return _Stat(mean, low, high, int(n) if isinstance(n, int) and not isinstance(n, bool) else None)


class _Results:
    """results.json, indexed for the report; validated only as far as the report needs."""

    def __init__(self, results: Mapping[str, Any], eval_dir: Path) -> None:
        if not isinstance(results, Mapping):
            raise InputError("results.json: expected an object")
        rows = results.get("per_prompt")
        if not isinstance(rows, list):
            raise InputError("results.json: 'per_prompt' must be a list of rows")
        self.rows: list[Mapping[str, Any]] = [
            r
            for r in rows
            if isinstance(r, Mapping) and all(k in r for k in ("variant", "skill", "prompt_id"))
        ]
        self.eval_dir = eval_dir
        self.benchmark = str(results.get("benchmark", "unknown"))
        self.confidence = results.get("confidence")
        self.metrics = _read_metrics(results)
        self.skills = _ordered(results.get("skills"), [str(r["skill"]) for r in self.rows], "'skills'")
        self.variants = _ordered(
            results.get("variants"), [str(r["variant"]) for r in self.rows], "'variants'"
        )
        self.summary = results.get("summary") if isinstance(results.get("summary"), Mapping) else {}
        self.paired = results.get("paired") if isinstance(results.get("paired"), Mapping) else {}
        self.by_key: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        self.prompts: dict[str, dict[str, Mapping[str, Any]]] = {s: {} for s in self.skills}
        for row in self.rows:
            variant, skill, pid = str(row["variant"]), str(row["skill"]), str(row["prompt_id"])
            self.by_key.setdefault((variant, skill, pid), row)
            self.prompts[skill].setdefault(pid, row)

    def score(self, row: Mapping[str, Any] | None, metric: str) -> float | None:
        scores = row.get("scores") if row is not None else None
        return _number(scores.get(metric)) if isinstance(scores, Mapping) else None

    def stat(self, metric: str, group: str, variant: str) -> _Stat | None:
        """The summary interval, else the plain mean of the per-prompt scores (no interval)."""
        found = _stat_from(_dig(self.summary, metric, group, variant))
        if found is not None:
            return found
        values = [
            v
            for r in self.rows
            if str(r["variant"]) == variant
            and (group == ALL or str(r["skill"]) == group)
            and (v := self.score(r, metric)) is not None
        ]
        return _Stat(sum(values) / len(values), None, None, len(values)) if values else None

    def difference(self, metric: str, group: str, variant: str) -> Mapping[str, Any] | None:
        found = _dig(self.paired, metric, group, variant)
        if isinstance(found, Mapping) and _number(found.get("difference")) is not None:
            return found
        return None

    def baseline(self) -> str:
        """The variant the paired differences are against (as results.json names it)."""
        named: set[str] = set()
        for metric in self.metrics:
            for group in self.groups():
                for variant in self.variants:
                    found = self.difference(metric.key, group, variant)
                    if found is not None and "baseline" in found:
                        named.add(str(found["baseline"]))
        return ", ".join(sorted(named)) or (BASELINE if BASELINE in self.variants else "none")

    def groups(self) -> list[str]:
        return [*self.skills, ALL]

    def sample_ids(self, skill: str, count: int) -> list[str]:
        return sorted(self.prompts.get(skill, {}))[: max(count, 0)]


# ---------------------------------------------------------------------------------------------------
# Images


def _load_cell(res: _Results, variant: str, skill: str, prompt_id: str, thumb_px: int) -> _Cell:
    """The thumbnail of one variant's image for one prompt, or why there is none (never raises)."""
    from PIL import Image, UnidentifiedImageError

    row = res.by_key.get((variant, skill, prompt_id))
    scores = {}
    if row is not None:
        for m in res.metrics:
            value = res.score(row, m.key)
            if value is not None:
                scores[m.key] = value
    if row is None:
        return _Cell(None, None, "no result", scores)
    relative = row.get("image") or f"images/{_variant_slug(variant)}/{prompt_id}.png"
    root = res.eval_dir.resolve()
    path = (root / str(relative)).resolve()
    if not path.is_relative_to(root):  # results.json is data: it may not point outside its folder
        return _Cell(None, None, "outside the eval folder", scores)
    if not path.is_file():
        return _Cell(None, None, "not found", scores)
    try:
        with Image.open(path) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((thumb_px, thumb_px), Image.Resampling.LANCZOS)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return _Cell(None, None, "unreadable", scores)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return _Cell(thumb, buffer.getvalue(), "", scores)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg canvas)


@contextmanager
def _figure(width: float, height: float, dpi: int, **kwargs: Any) -> Iterator[Any]:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")  # e.g. CJK prompts: boxes
        fig = Figure(figsize=(width, height), dpi=dpi, facecolor="white", **kwargs)
        FigureCanvasAgg(fig)
        yield fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


def _colors(variants: Sequence[str]) -> dict[str, str]:
    colors, experts = {}, 0
    for v in variants:
        if v == BASELINE:
            colors[v] = _BASE_COLOR
        elif v == "merged":
            colors[v] = _MERGED_COLOR
        else:
            colors[v] = _EXPERT_COLORS[experts % len(_EXPERT_COLORS)]
            experts += 1
    return colors


def _bar_chart(res: _Results, metric: _Metric, colors: Mapping[str, str]) -> bytes | None:
    """Grouped bars (groups: skills and "all"; a bar per variant with data); None when no data."""
    groups = res.groups()
    stats = {(g, v): res.stat(metric.key, g, v) for g in groups for v in res.variants}
    variants = [v for v in res.variants if any(stats[g, v] is not None for g in groups)]
    if not variants:
        return None
    slot = 0.82 / len(variants)
    # Wide enough for the bars, capped so that the page (about 1200 px) shows it at a readable scale.
    width = min(max(2.0 + len(groups) * (0.2 * len(variants) + 0.45), 6.5), 14.0)
    rotate = len(groups) > 8 or max(len(g) for g in groups) > 12
    with _figure(width, 4.2 if rotate else 3.8, _DPI, layout="constrained") as fig:
        ax = fig.add_subplot()
        top, bottom, whiskers = 0.0, 0.0, False
        for i, variant in enumerate(variants):
            offset = (i - (len(variants) - 1) / 2) * slot
            present = [(x, stats[g, variant]) for x, g in enumerate(groups) if stats[g, variant] is not None]
            xs = [x + offset for x, _ in present]
            ax.bar(
                xs, [s.mean for _, s in present], slot * 0.92, color=colors[variant], label=variant, zorder=2
            )
            with_ci = [(x + offset, s) for x, s in present if s.has_interval]
            if with_ci:
                whiskers = True
                ax.errorbar(
                    [x for x, _ in with_ci],
                    [s.mean for _, s in with_ci],
                    yerr=[
                        [abs(s.mean - s.low) for _, s in with_ci],
                        [abs(s.high - s.mean) for _, s in with_ci],
                    ],
                    fmt="none",
                    ecolor="#222222",
                    elinewidth=0.9,
                    capsize=min(3.0, 40 * slot),
                    zorder=3,
                )
            top = max([top, *(s.high if s.has_interval else s.mean for _, s in present)])
            bottom = min([bottom, *(s.low if s.has_interval else s.mean for _, s in present)])
        if len(groups) > 1:
            ax.axvline(len(groups) - 1.5, color="#b0b6bc", linestyle=(0, (3, 3)), linewidth=0.8, zorder=1)
        ax.set_xticks(range(len(groups)), groups)
        if rotate:
            ax.tick_params(axis="x", labelrotation=30)
            for label in ax.get_xticklabels():
                label.set(ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        if metric.bounds == "0-1" and bottom >= 0:
            ax.set_ylim(0, max(1.0, top * 1.02))
        elif top > 0:
            # From 0, or below the lowest bar or interval (ImageReward's means can be negative).
            ax.set_ylim(bottom=bottom * 1.05 if bottom < 0 else 0)
        ax.set_ylabel(f"{metric.label}" + (f" ({metric.scale})" if metric.scale else ""))
        subtitle = f"{metric.conventions} · bars: mean, " + (
            f"whiskers: {_confidence_text(res.confidence)}" if whiskers else "no intervals in the results"
        )
        # Wrapped to the axes' width (the figure's, less the y label and the legend beside it, about
        # 2.6 in; 8 pt text is about 15 characters an inch): one long line ran under the legend.
        subtitle = _wrap(subtitle, int((width - 2.6) * 15), 3)
        ax.set_title(metric.label, loc="left", fontweight="bold", pad=8 + 11 * (subtitle.count("\n") + 1))
        ax.text(
            0,
            1.015,
            subtitle,
            transform=ax.transAxes,
            fontsize=8,
            color="#5f6b76",
            va="bottom",
        )
        ax.grid(axis="y", color="#e3e6e8", linewidth=0.8, zorder=0)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.legend(loc="outside right upper", frameon=False, title="variant", alignment="left")
        return _png(fig)


def _wrap(text: str, chars: int, lines: int) -> str:
    wrapped = textwrap.wrap(" ".join(text.split()), max(chars, 8)) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(chars - 1, 1)].rstrip() + "…"
    return "\n".join(wrapped)


def _paste(fig: Any, thumb: Any, left_px: float, bottom_px: float, cell_px: int) -> None:
    """``thumb`` scaled (nearest pixel) to fit a ``cell_px`` square whose lower left corner is at
    (``left_px``, ``bottom_px``) of the figure, centred in it, as ``imshow`` in a square Axes
    showed it."""
    import numpy as np
    from PIL import Image

    scale = min(cell_px / thumb.width, cell_px / thumb.height)
    size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
    shown = thumb if size == thumb.size else thumb.resize(size, Image.Resampling.NEAREST)
    x = round(left_px + (cell_px - size[0]) / 2)
    y = round(bottom_px + (cell_px - size[1]) / 2)
    fig.figimage(np.asarray(shown), xo=x, yo=y, origin="upper", zorder=1)


def _grid_figure(
    res: _Results,
    skill: str,
    prompt_ids: Sequence[str],
    cells: Mapping[tuple[str, str], _Cell],
    thumb_px: int,
) -> bytes:
    """The sample grid as one PNG: a row per prompt (its text above), a column per variant."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    dpi = _GRID_DPI
    pad = 0.12
    image_in = thumb_px / dpi
    col_w = max(image_in, 1.5) + 2 * pad
    score_lines = max(len(res.metrics), 1)
    text_h, score_h = 0.46, 0.16 * score_lines + 0.12
    row_h = text_h + image_in + score_h
    header_h = 0.62
    width = len(res.variants) * col_w + 2 * pad
    height = header_h + len(prompt_ids) * row_h + pad
    chars = int(col_w * 72 / (7 * 0.55))  # characters of an 7-pt line in one column
    with _figure(width, height, dpi) as fig:

        def at(x: float, y_from_top: float) -> tuple[float, float]:
            return x / width, 1 - y_from_top / height

        fig.text(*at(pad, 0.1), f"{skill} · samples", fontsize=11, fontweight="bold", va="top")
        for j, variant in enumerate(res.variants):
            fig.text(
                *at(pad + (j + 0.5) * col_w, header_h - 0.06),
                _wrap(variant, chars, 1),
                ha="center",
                va="bottom",
                fontsize=9,
                fontweight="bold",
            )
        for i, pid in enumerate(prompt_ids):
            top = header_h + i * row_h
            fig.add_artist(
                Line2D([pad / width, 1 - pad / width], [at(0, top)[1]] * 2, color="#d8dee4", linewidth=0.8)
            )
            prompt = str(res.prompts[skill][pid].get("prompt", ""))
            fig.text(
                *at(pad, top + 0.06),
                _wrap(f"{pid}: {prompt}", int((width - 2 * pad) * 72 / (9 * 0.55)), 2),
                fontsize=9,
                va="top",
            )
            for j, variant in enumerate(res.variants):
                cell = cells[pid, variant]
                x0 = pad + j * col_w + (col_w - image_in) / 2
                left, bottom = at(x0, top + text_h + image_in)
                if cell.thumb is not None:
                    # Pasted at its pixels (one per figure pixel), not an Axes per cell: those made
                    # a 20-skill report's grids take half a minute.
                    _paste(fig, cell.thumb, left * width * dpi, bottom * height * dpi, thumb_px)
                else:
                    size = (image_in / width, image_in / height)
                    fig.add_artist(
                        Rectangle((left, bottom), *size, transform=fig.transFigure, color="#eef0f2")
                    )
                    fig.text(
                        left + size[0] / 2,
                        bottom + size[1] / 2,
                        f"image missing\n({cell.missing})",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="#5f6b76",
                    )
                lines = [
                    _wrap(f"{m.label}: {m.fmt(cell.scores[m.key])}", chars, 1)
                    for m in res.metrics
                    if m.key in cell.scores
                ]
                fig.text(
                    *at(pad + (j + 0.5) * col_w, top + text_h + image_in + 0.05),
                    "\n".join(lines) or "no scores",
                    ha="center",
                    va="top",
                    fontsize=7,
                    color="#333333",
                    linespacing=1.35,
                )
        return _png(fig)


# ---------------------------------------------------------------------------------------------------
# HTML

_CSS = """
:root { --fg: #1d2327; --muted: #5f6b76; --line: #d8dee4; --head: #f3f5f7;
        --good: #116329; --good-bg: #dafbe1; --bad: #a40e26; --bad-bg: #ffebe9; }
* { box-sizing: border-box; }
body { margin: 0; background: #f6f8fa; color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 19px; margin: 40px 0 2px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 22px 0 6px; }
.conv { color: var(--muted); margin: 2px 0 10px; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0 0 12px; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
nav { font-size: 13px; color: var(--muted); }
nav a { color: #0b5cad; text-decoration: none; margin-right: 10px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 4px 0 10px; }
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: right; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
th.k, td.k { text-align: left; }
tr.all td, tr.all th { border-top: 2px solid #aab2ba; }
.ci, .sub { display: block; color: var(--muted); font-size: 12px; }
td.best .m { font-weight: 700; }
td.good { background: var(--good-bg); color: var(--good); }
td.bad { background: var(--bad-bg); color: var(--bad); }
td.good .ci, td.bad .ci { color: inherit; }
.note { color: var(--muted); font-size: 13px; margin: 0 0 8px; }
figure { margin: 6px 0 8px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
table.grid { table-layout: fixed; }
table.grid th, table.grid td { text-align: center; overflow-wrap: anywhere; }
table.grid tr.prompt th { text-align: left; font-weight: 500; background: #fbfcfd; padding: 6px 9px; }
table.grid tr.prompt .pid { color: var(--muted); font-size: 12px; margin-left: 8px; }
table.grid img { display: block; margin: 0 auto 4px; border-radius: 3px; }
.scores { font-size: 12px; line-height: 1.35; text-align: left; display: inline-block; }
.scores span { color: var(--muted); }
.missing { display: flex; align-items: center; justify-content: center; flex-direction: column;
           margin: 0 auto 4px; color: var(--muted); font-size: 12px; border: 1px dashed #c4cbd2;
           background: repeating-linear-gradient(45deg, #f6f7f8, #f6f7f8 8px, #eef0f2 8px, #eef0f2 16px); }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
""".strip()


def _means_table(res: _Results, metric: _Metric) -> str:
    groups = res.groups()
    stats = {(g, v): res.stat(metric.key, g, v) for g in groups for v in res.variants}
    variants = [v for v in res.variants if any(stats[g, v] is not None for g in groups)]
    ci = _confidence_text(res.confidence)
    head = "".join(f"<th>{_esc(v)}</th>" for v in variants)
    body = []
    for g in groups:
        present = {v: stats[g, v] for v in variants if stats[g, v] is not None}
        if not present:
            continue
        pick = max if metric.higher_is_better else min
        best = pick(present, key=lambda v: present[v].mean) if len(present) > 1 else None
        ns = sorted({s.n for s in present.values() if s.n is not None})
        cells = []
        for v in variants:
            s = present.get(v)
            if s is None:
                cells.append('<td class="na">—</td>')
                continue
            interval = f"[{metric.fmt(s.low)}, {metric.fmt(s.high)}]" if s.has_interval else "no interval"
            n_note = f" · n={s.n}" if len(ns) > 1 and s.n is not None else ""
            cls = ' class="best"' if v == best else ""
            cells.append(
                f'<td{cls}><span class="m">{metric.fmt(s.mean)}</span>'
                f'<span class="ci">{interval}{n_note}</span></td>'
            )
        n_text = "/".join(str(n) for n in ns) or "—"
        row_cls = ' class="all"' if g == ALL else ""
        body.append(f'<tr{row_cls}><th class="k">{_esc(g)}</th><td>{n_text}</td>{"".join(cells)}</tr>')
    return (
        f"<h3>Means with {_esc(ci)}</h3>"
        f'<p class="note">{_esc(metric.label)}: mean per skill and over all prompts; below each mean its '
        f"{_esc(ci)}. Bold: the best variant of the row.</p>"
        f'<div class="scroll"><table class="means"><thead><tr><th class="k">skill</th><th>n</th>{head}'
        f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _paired_table(res: _Results, metric: _Metric) -> str:
    groups = res.groups()
    others = [v for v in res.variants if v != BASELINE]
    found = {(g, v): res.difference(metric.key, g, v) for g in groups for v in others}
    variants = [v for v in others if any(found[g, v] is not None for g in groups)]
    baselines = sorted({str(d.get("baseline", BASELINE)) for d in found.values() if d is not None})
    baseline = ", ".join(baselines) or BASELINE
    title = f"<h3>Paired differences vs {_esc(baseline)}</h3>"
    if not variants:
        why = "only one variant: nothing to compare" if len(res.variants) < 2 else "no paired differences"
        return f'{title}<p class="note">{_esc(why)} for {_esc(metric.label)}.</p>'
    better = "above" if metric.higher_is_better else "below"
    head = "".join(f"<th>{_esc(v)}</th>" for v in variants)
    body = []
    for g in groups:
        if all(found[g, v] is None for v in variants):
            continue
        cells = []
        for v in variants:
            d = found[g, v]
            if d is None:
                cells.append('<td class="na">—</td>')
                continue
            diff, low, high = _number(d.get("difference")), _number(d.get("low")), _number(d.get("high"))
            p = _number(d.get("p_value"))
            cls, mark = "", ""
            # Both tests must agree: a zero-width interval (one prompt, or equal differences) excludes
            # 0 whatever the evidence, and its p-value says how little that is (1.0 for one prompt).
            significant = p is None or p < _alpha(res.confidence)
            if low is not None and high is not None and (low > 0 or high < 0) and significant:
                up = low > 0
                cls = "good" if up == metric.higher_is_better else "bad"
                mark = "▲ " if up else "▼ "
            interval = (
                f"[{metric.fmt(low, signed=True)}, {metric.fmt(high, signed=True)}]"
                if low is not None and high is not None
                else "no interval"
            )
            n = f" · n={d['n']}" if isinstance(d.get("n"), int) else ""
            cells.append(
                f'<td class="{cls}"><span class="m">{mark}{metric.fmt(diff, signed=True)}</span>'
                f'<span class="ci">{interval}</span><span class="ci">{_esc(_p_text(p))}{n}</span></td>'
            )
        row_cls = ' class="all"' if g == ALL else ""
        body.append(f'<tr{row_cls}><th class="k">{_esc(g)}</th>{"".join(cells)}</tr>')
    return (
        f"{title}"
        f'<p class="note">{_esc(metric.label)} of each variant minus {_esc(baseline)}, on the same prompts '
        f"and seeds; {_esc(_confidence_text(res.confidence))} of the difference and its p-value. "
        f"Highlighted: the interval excludes 0 (▲ above, ▼ below) and the p-value is below "
        f"{_alpha_text(res.confidence)}; green when the variant is better "
        f"({better} 0 for a metric where {'higher' if metric.higher_is_better else 'lower'} is better), "
        f"red when worse.</p>"
        f'<div class="scroll"><table class="paired"><thead><tr><th class="k">skill</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _grid_table(
    res: _Results,
    skill: str,
    prompt_ids: Sequence[str],
    cells: Mapping[tuple[str, str], _Cell],
    thumb_px: int,
) -> str:
    column = max(thumb_px, 150) + 20  # fixed columns: every skill's grid lines up, long prompts wrap
    head = "".join(f"<th>{_esc(v)}</th>" for v in res.variants)
    rows = []
    for pid in prompt_ids:
        first = res.prompts[skill][pid]
        seed = f" · seed {_esc(first['seed'])}" if "seed" in first else ""
        rows.append(
            f'<tr class="prompt"><th colspan="{len(res.variants)}">{_esc(first.get("prompt", ""))}'
            f'<span class="pid">{_esc(pid)}{seed}</span></th></tr>'
        )
        tds = []
        for v in res.variants:
            cell = cells[pid, v]
            if cell.jpeg is not None:
                w, h = cell.thumb.size
                picture = (
                    f'<img src="{_data_uri(cell.jpeg, "image/jpeg")}" width="{w}" height="{h}" '
                    f'alt="{_esc(v)}: {_esc(first.get("prompt", ""))}">'
                )
            else:
                picture = (
                    f'<div class="missing" style="width:{thumb_px}px;height:{thumb_px}px">'
                    f"image missing<span>({_esc(cell.missing)})</span></div>"
                )
            lines = "<br>".join(
                f"<span>{_esc(m.label)}</span> {m.fmt(cell.scores[m.key])}"
                for m in res.metrics
                if m.key in cell.scores
            )
            tds.append(f'<td>{picture}<div class="scores">{lines or "<span>no scores</span>"}</div></td>')
        rows.append(f"<tr>{''.join(tds)}</tr>")
    return (
        f'<div class="scroll"><table class="grid" style="width:{len(res.variants) * column}px">'
        f"<thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def write_report(
    results: dict,
    eval_dir: Path,
    out_dir: Path,
    *,
    samples_per_skill: int = 4,
    thumb_px: int = 192,
) -> ReportFiles:
    """Write ``out_dir/report.html`` and ``out_dir/figures/*.png`` for an eval folder's results.

    ``results``: the parsed ``eval_dir/results.json``; image paths in it are relative to ``eval_dir``
    (one pointing outside it is treated as missing). Returns ``{"html": path, "figures": [paths]}``
    (bar charts in metric order, then sample grids in skill order).
    """
    if thumb_px < 16:
        raise InputError(f"thumb_px: expected >= 16, got {thumb_px}")
    eval_dir, out_dir = Path(eval_dir), Path(out_dir)
    res = _Results(results, eval_dir)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    colors = _colors(res.variants)
    ci = _confidence_text(res.confidence)

    metric_sections = []
    for metric in res.metrics:
        anchor = f"metric-{_slug(metric.key)}"
        chart = _bar_chart(res, metric, colors)
        parts = [
            f'<section id="{_esc(anchor)}"><h2>{_esc(metric.label)}</h2>'
            f'<p class="conv">{_esc(metric.label)} — {_esc(metric.conventions)}</p>'
        ]
        if chart is None:
            parts.append(f'<p class="note">No scores for {_esc(metric.label)} in this run.</p></section>')
            metric_sections.append("".join(parts))
            continue
        path = figures_dir / f"{_slug(metric.key)}.png"
        path.write_bytes(chart)
        figures.append(path)
        parts.append(
            f'<figure><img src="{_data_uri(chart, "image/png")}" alt="{_esc(metric.label)} per skill and '
            f'variant, with {_esc(ci)}"><figcaption class="note">{_esc(metric.label)} per skill and variant '
            f"(bars: means; whiskers: {_esc(ci)}); {_esc(metric.conventions)}.</figcaption></figure>"
        )
        parts.append(_means_table(res, metric))
        parts.append(_paired_table(res, metric))
        parts.append("</section>")
        metric_sections.append("".join(parts))

    sample_sections = []
    for i, skill in enumerate(res.skills):
        prompt_ids = res.sample_ids(skill, samples_per_skill)
        anchor = f"samples-{i}-{_slug(skill)}"
        title = f'<section id="{_esc(anchor)}"><h3>{_esc(skill)}</h3>'
        if not prompt_ids:
            sample_sections.append(f'{title}<p class="note">No prompts for this skill.</p></section>')
            continue
        cells = {
            (pid, v): _load_cell(res, v, skill, pid, thumb_px) for pid in prompt_ids for v in res.variants
        }
        path = figures_dir / f"samples_{_slug(skill)}.png"
        path.write_bytes(_grid_figure(res, skill, prompt_ids, cells, thumb_px))
        figures.append(path)
        total = len(res.prompts[skill])
        sample_sections.append(
            f'{title}<p class="note">The first {len(prompt_ids)} of {total} prompts by id; '
            f"each row one prompt (same seed for every variant), each column one variant.</p>"
            f"{_grid_table(res, skill, prompt_ids, cells, thumb_px)}</section>"
        )

    counts = ", ".join(f"{_esc(s)} {len(res.prompts[s])}" for s in res.skills)
    n_prompts = sum(len(p) for p in res.prompts.values())
    metrics_dd = "<br>".join(
        f"<b>{_esc(m.label)}</b> <span class='sub' style='display:inline'>({_esc(m.key)}; "
        f"{_esc(m.conventions)})</span>"
        for m in res.metrics
    )
    nav = "".join(
        f'<a href="#metric-{_esc(_slug(m.key))}">{_esc(m.label)}</a>' for m in res.metrics
    ) + "".join(
        f'<a href="#samples-{i}-{_esc(_slug(s))}">samples: {_esc(s)}</a>' for i, s in enumerate(res.skills)
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SELMA evaluation · {_esc(res.benchmark)}</title>
<style>
{_CSS}
</style>
</head>
<body>
<main>
<header>
<h1>SELMA evaluation · {_esc(res.benchmark)}</h1>
<dl class="meta">
<dt>benchmark</dt><dd>{_esc(res.benchmark)}</dd>
<dt>variants</dt><dd>{_esc(", ".join(res.variants))} <span class="sub" style="display:inline">(baseline: \
{_esc(res.baseline())})</span></dd>
<dt>prompts</dt><dd>{n_prompts} ({counts})</dd>
<dt>confidence</dt><dd>{_esc(ci)} (intervals on every mean and paired difference)</dd>
<dt>metrics</dt><dd>{metrics_dd}</dd>
</dl>
<nav>{nav}</nav>
</header>
{"".join(metric_sections)}
<section id="samples"><h2>Samples</h2>
{"".join(sample_sections)}
</section>
<footer>Written by selma_core.report from results.json; every image and figure is embedded in this \
file.</footer>
</main>
</body>
</html>
"""
    html_path = out_dir / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return {"html": html_path, "figures": figures}
