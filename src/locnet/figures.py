"""Figures of the study (paper Figs. 3-5 and the training curves).

Every function draws one figure, saves it as ``{out_prefix}.png`` (300 dpi) and
``{out_prefix}.pdf`` (text kept as text), atomically, and returns ``[png_path, pdf_path]``.
Figures are sized for a paper: 3.5 in wide for one column, 7 in for two columns, with 7 pt
text. Methods always appear in Table 1's order, with the fixed colours of
:data:`locnet.methods.REGISTRY` and the labels of :func:`locnet.metrics.method_label` (inside
``with locnet.metrics.labels_from_config(config):`` they give the spacings of the run's
levels). Any number of landmarks stays readable: up to 8 get the Okabe-Ito colours, more get
20 distinct colours (tab20) and, beyond 20, distinct markers too. No pyplot state is used
(figures are plain ``matplotlib.figure.Figure`` objects rendered by the Agg/PDF backends), so
the functions are safe in headless jobs and do not leak figures.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import patheffects
from matplotlib.figure import Figure

from locnet.fileio import atomic_write

from .methods import HEATMAP_FIGURE
from .metrics import (
    PROPOSED_METHOD,
    chi2_radius_sq,
    errors_of,
    landmark_order,
    method_color,
    method_label,
    method_order,
    seed_tables,
    select_subset,
)
from .stats import confidence_correlation, volumes_of

__all__ = [
    "DPI",
    "COLUMN_WIDTH_IN",
    "PAGE_WIDTH_IN",
    "landmark_colors",
    "landmark_markers",
    "save_figure",
    "violin_errors",
    "confidence_vs_error",
    "training_curves",
    "heatmap_figure",
    "overlay_figure",
    "write_overlay",
]

DPI = 300
COLUMN_WIDTH_IN = 3.5
PAGE_WIDTH_IN = 7.0

_RC = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "legend.title_fontsize": 6,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "lines.linewidth": 1.0,
    "pdf.fonttype": 42,  # TrueType: text stays editable in the PDF
    "ps.fonttype": 42,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_LANDMARK_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
                    "#F0E442", "#000000")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p")


def landmark_colors(landmarks: Sequence[str]) -> dict[str, str]:
    """Fixed colours for landmarks, in the given (configured) order.

    Up to 8 landmarks: the colour-blind-safe Okabe-Ito colours; more: the 20 colours of
    tab20 (distinct for up to 20 landmarks; beyond, :func:`landmark_markers` tells them apart).
    """
    landmarks = list(landmarks)
    if len(landmarks) <= len(_LANDMARK_COLORS):
        pal = list(_LANDMARK_COLORS)
    else:
        pal = [mpl.colors.to_hex(c) for c in mpl.colormaps["tab20"].colors]
    return {lm: pal[i % len(pal)] for i, lm in enumerate(landmarks)}


def landmark_markers(landmarks: Sequence[str]) -> dict[str, str]:
    """Scatter markers for landmarks: all circles while colours alone tell them apart."""
    landmarks = list(landmarks)
    n_colors = len(_LANDMARK_COLORS) if len(landmarks) <= len(_LANDMARK_COLORS) else 20
    return {lm: _MARKERS[(i // n_colors) % len(_MARKERS)] for i, lm in enumerate(landmarks)}


def _fit_width(text: str, width_in: float, fontsize: float) -> str:
    """Wrap ``text`` at word boundaries to about ``width_in`` inches at ``fontsize`` points."""
    chars = max(int(width_in * 72.0 / (0.55 * fontsize)), 10)  # ~0.55 em per character
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False)
                     for line in text.split("\n"))


def _legend_columns(n: int, width_in: float, longest: int, fontsize: float) -> int:
    """Legend columns that fit ``n`` entries of ``longest`` characters into ``width_in``."""
    entry_in = (longest * 0.55 * fontsize + 3.0 * fontsize) / 72.0  # text + marker + gap
    return int(max(1, min(n, width_in // entry_in)))


def save_figure(fig: Figure, out_prefix: str | os.PathLike) -> list[Path]:
    """Save ``fig`` as ``{out_prefix}.png`` and ``.pdf``, each atomically
    (:func:`locnet.fileio.atomic_write`)."""
    prefix = Path(out_prefix)
    paths = []
    for ext in ("png", "pdf"):
        path = prefix.with_name(f"{prefix.name}.{ext}")
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI)  # the format is not left to the file name
        paths.append(path)
    return paths


def _new_figure(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _empty_message(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------
# Fig. 4: error distribution per method
# ---------------------------------------------------------------------------------------------


def _wrap(label: str, width: int = 22) -> str:
    """Wrap a tick label, keeping a spacing ("(10-1.25 mm)") on one line."""
    keep = re.sub(r"\(([^()]*?) mm\)", "(\\1\u00a0mm)", label)
    return textwrap.fill(keep, width, break_on_hyphens=False).replace("\u00a0", " ")


def _plain_log_axis(axis) -> None:
    """Log axis labelled with plain numbers (0.5, 1, 2, 5, 10, ...) rather than powers of 10.

    Over more than two decades only the decades are labelled.
    """
    lo, hi = axis.get_view_interval()
    span = np.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    subs = (1.0, 2.0, 5.0) if span <= 2.5 else (1.0,)
    axis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mpl.ticker.NullFormatter())


def _long_errors(predictions: Mapping[str, pd.DataFrame], subset: str | None) -> pd.DataFrame:
    parts = []
    for m, df in predictions.items():
        df = select_subset(df, subset)
        seed = df["seed"].astype(int).values if "seed" in df.columns else 0
        parts.append(pd.DataFrame({"method": m, "seed": seed,
                                   "landmark": df["landmark"].astype(str).values,
                                   "error_mm": errors_of(df).values}))
    if not parts:
        return pd.DataFrame(columns=["method", "seed", "landmark", "error_mm"])
    long = pd.concat(parts, ignore_index=True)
    return long[np.isfinite(long["error_mm"].astype(float))]


def violin_errors(
    predictions: Mapping[str, pd.DataFrame],
    out_prefix: str | os.PathLike,
    subset: str | None = "test",
    by_landmark: bool = False,
    log_y: bool = False,
    width_in: float = PAGE_WIDTH_IN,
    height_in: float = 2.6,
) -> list[Path]:
    """Fig. 4: violin plot of the localisation error (mm) per method, in Table 1's order.

    Violins are cut at the data range (``cut=0``) and show the quartiles (dashed: median);
    every landmark is a light dot; a white diamond marks the mean (the number of Table 1).
    With ``by_landmark`` the violins are split by landmark (hue). Missing landmarks are left
    out; tick labels give the number of annotated landmarks.

    Several training seeds (column ``seed``): a violin holds every seed's errors, a short black
    bar marks each seed's mean (its spread is Table 1's between-seed sd), the diamond is the
    mean over seeds, and the tick label gives landmarks x seeds.
    """
    order = method_order(predictions)
    data = _long_errors({m: predictions[m] for m in order}, subset)
    landmarks = landmark_order(predictions)
    with mpl.rc_context(_RC):
        fig = _new_figure(width_in, height_in)
        ax = fig.add_subplot()
        if data.empty:
            _empty_message(ax, "no annotated landmarks")
            return save_figure(fig, out_prefix)
        common = dict(data=data, x="method", y="error_mm", order=order, ax=ax)
        split = by_landmark and len(landmarks) > 1
        if split:
            pal = landmark_colors(landmarks)
            sns.violinplot(**common, hue="landmark", hue_order=landmarks, palette=pal, cut=0,
                           inner="quart", density_norm="width", linewidth=0.6, dodge=True,
                           saturation=0.9, width=0.8)
            sns.stripplot(**common, hue="landmark", hue_order=landmarks,
                          palette={lm: "0.15" for lm in landmarks}, dodge=True, size=1.2,
                          alpha=0.3, jitter=0.08, legend=False, zorder=5)
            handles, labels = ax.get_legend_handles_labels()
            labels = [lb.replace("_", " ") for lb in labels]
            fs = 6 if len(landmarks) <= 8 else 5
            ax.legend(handles, labels, frameon=False, fontsize=fs,
                      loc="lower center", bbox_to_anchor=(0.5, 1.0),
                      ncol=_legend_columns(len(labels), width_in - 0.5,
                                           max(map(len, labels)), fs),
                      handlelength=1.2, columnspacing=1.0)
            # centres of the dodged violins (seaborn splits a width of 0.8 evenly)
            k = len(landmarks)
            offsets = {lm: -0.4 + 0.8 * (j + 0.5) / k for j, lm in enumerate(landmarks)}
            means = data.groupby(["method", "landmark"])["error_mm"].mean()
            pts = [(order.index(m) + offsets[lm], v) for (m, lm), v in means.items()
                   if lm in offsets]
        else:
            pal = {m: method_color(m) for m in order}
            sns.violinplot(**common, hue="method", hue_order=order, palette=pal, legend=False,
                           cut=0, inner="quart", density_norm="width", linewidth=0.6,
                           saturation=0.9)
            sns.stripplot(**common, color="0.15", size=1.2, alpha=0.3, jitter=0.15, zorder=5)
            seed_means = data.groupby(["method", "seed"])["error_mm"].mean()
            if data.groupby("method")["seed"].nunique().max() > 1:
                ax.scatter([order.index(m) for m, _ in seed_means.index], seed_means.values,
                           marker="_", s=60, color="black", linewidth=0.9, zorder=9,
                           label="seed mean")
            means = seed_means.groupby(level="method").mean()
            pts = [(order.index(m), v) for m, v in means.items()]
        if pts:
            px, py = zip(*pts)
            ax.scatter(px, py, marker="D", s=10, color="white", edgecolor="black",
                       linewidth=0.6, zorder=10, label="mean")
        counts = data.groupby(["method", "seed"]).size().groupby(level="method").max()
        n_seeds = data.groupby("method")["seed"].nunique()
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([_wrap(method_label(m)) + f"\nn = {counts.get(m, 0)}"
                            + (f" × {n_seeds[m]} seeds" if n_seeds.get(m, 1) > 1 else "")
                            for m in order])
        ax.set_xlabel("")
        ax.set_ylabel("Localisation error (mm)")
        if log_y:
            ax.set_yscale("log")
            ax.autoscale_view()
            _plain_log_axis(ax.yaxis)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(axis="y", linewidth=0.3, color="0.85")
        ax.set_axisbelow(True)
        return save_figure(fig, out_prefix)


# ---------------------------------------------------------------------------------------------
# Fig. 5: confidence volume versus error
# ---------------------------------------------------------------------------------------------


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def confidence_vs_error(
    pred_noise_df: pd.DataFrame,
    out_prefix: str | os.PathLike,
    subset: str | None = "test",
    level: float = 0.90,
    method: str = PROPOSED_METHOD,
    width_in: float = COLUMN_WIDTH_IN,
    height_in: float = 2.8,
) -> list[Path]:
    """Fig. 5: confidence volume (mm^3) versus error (mm) of the noisy method, log-log axes.

    Points are coloured by landmark. The annotation gives Pearson r and p on the volume (as in
    the paper), Spearman rho and p, and n, pooled over landmarks (see
    :func:`locnet.stats.confidence_correlation`). The dashed line is a least-squares fit of
    log error on log volume. Points with zero volume or zero error cannot be shown on log axes
    and are counted in the annotation.
    """
    df = select_subset(pred_noise_df, subset).copy()
    df["error_mm"] = errors_of(df)
    df["volume"] = volumes_of(df, level)
    # the table's (configured) order, before dropping missing rows: fixed colours per landmark
    landmarks = list(dict.fromkeys(df["landmark"].astype(str)))
    df = df[np.isfinite(df["error_mm"]) & np.isfinite(df["volume"])]
    pal = landmark_colors(landmarks)
    markers = landmark_markers(landmarks)
    c = confidence_correlation(pred_noise_df, subset, level=level)
    # few landmarks: legend inside the axes; more: below them, in as many columns as fit,
    # the figure growing by its rows so that the axes keep their size
    outside = len(landmarks) > 4
    legend_fs = 6 if len(landmarks) <= 8 else 5
    if outside:
        names = [lm.replace("_", " ") for lm in landmarks] + ["log-log fit"]
        ncol = _legend_columns(len(names), width_in - 0.2, max(map(len, names)), legend_fs)
        n_rows = -(-len(names) // ncol)
        height_in = height_in + n_rows * 1.35 * legend_fs / 72.0 + 0.05
    with mpl.rc_context(_RC):
        fig = _new_figure(width_in, height_in)
        ax = fig.add_subplot()
        shown = df[(df["volume"] > 0) & (df["error_mm"] > 0)]
        if shown.empty:
            _empty_message(ax, "no annotated landmarks with a confidence volume")
            return save_figure(fig, out_prefix)
        for lm in landmarks:
            part = shown[shown["landmark"].astype(str) == lm]
            ax.scatter(part["volume"], part["error_mm"], s=8, alpha=0.75, color=pal[lm],
                       marker=markers[lm], edgecolor="none", label=lm.replace("_", " "))
        ax.set_xscale("log")
        ax.set_yscale("log")
        if len(shown) >= 3 and np.ptp(np.log(shown["volume"])) > 0:
            b, a = np.polyfit(np.log10(shown["volume"]), np.log10(shown["error_mm"]), 1)
            xv = np.geomspace(shown["volume"].min(), shown["volume"].max(), 50)
            ax.plot(xv, 10 ** (a + b * np.log10(xv)), "--", color="0.35", linewidth=0.8,
                    label="log-log fit")
        text = (f"Pearson r = {c['pearson_r']:.3f} (p = {_fmt_p(c['pearson_p'])})\n"
                f"Spearman ρ = {c['spearman_rho']:.3f} (p = {_fmt_p(c['spearman_p'])})\n"
                f"n = {c['n']}")
        hidden = len(df) - len(shown)
        if hidden:
            text += f" ({hidden} not shown: zero value)"
        ax.text(0.03, 0.97, text, transform=ax.transAxes, ha="left", va="top", fontsize=6,
                bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="0.8",
                          linewidth=0.5))
        ax.set_xlabel(f"{100 * level:.0f}% confidence volume (mm³)")
        ax.set_ylabel("Localisation error (mm)")
        if outside:
            fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=ncol,
                       frameon=False, fontsize=legend_fs, markerscale=1.2, handlelength=1.2,
                       handletextpad=0.3, columnspacing=0.8, labelspacing=0.25)
        else:
            ax.legend(frameon=False, loc="lower right", markerscale=1.2, fontsize=legend_fs)
        ax.autoscale_view()
        _plain_log_axis(ax.xaxis)
        _plain_log_axis(ax.yaxis)
        ax.grid(which="major", linewidth=0.3, color="0.85")
        ax.set_axisbelow(True)
        if method:
            ax.set_title(_fit_width(method_label(method), width_in - 0.4, 7), loc="left")
        return save_figure(fig, out_prefix)


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------

_LEVEL_RE = {
    "train": re.compile(r"^loss_level(\d+)$"),
    "val": re.compile(r"^val_loss_level(\d+)$"),
    "weight": re.compile(r"^weight_level(\d+)$"),
}


def _levels(df: pd.DataFrame, kind: str) -> dict[int, str]:
    found = {}
    for c in df.columns:
        mt = _LEVEL_RE[kind].match(str(c))
        if mt and pd.to_numeric(df[c], errors="coerce").notna().any():
            found[int(mt.group(1))] = c
    return dict(sorted(found.items()))


def _has(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and pd.to_numeric(df[col], errors="coerce").notna().any()


def _level_color(level: int, n_levels: int) -> tuple:
    cmap = mpl.colormaps["viridis"]
    return cmap(0.85 * level / max(n_levels - 1, 1))


def _kept_epoch(h: pd.DataFrame) -> float | None:
    """The epoch training kept: the lowest model-selection score (``val_score_mm``; epoch 0 by
    its raw error, the fallback), else the lowest validation error; ties: the earliest."""
    if not _has(h, "val_error_mm"):
        return None
    ep = (pd.to_numeric(h["epoch"], errors="coerce").to_numpy(float)
          if "epoch" in h.columns else np.arange(1, len(h) + 1, dtype=float))
    err = pd.to_numeric(h["val_error_mm"], errors="coerce").to_numpy(float)
    score = err.copy()
    if _has(h, "val_score_mm"):
        score = pd.to_numeric(h["val_score_mm"], errors="coerce").to_numpy(float, copy=True)
        score[ep == 0] = err[ep == 0]
    if not np.isfinite(score).any():
        return None
    return float(ep[int(np.nanargmin(score))])


def _history_lines(ax, kind: str, h: pd.DataFrame, method: str, n_levels: int, *, main: bool,
                   seed: int | None, kept: float | None) -> list:
    """The lines of one training run in one panel; ``main``: drawn in full and labelled."""
    ep = (pd.to_numeric(h["epoch"], errors="coerce").to_numpy(float)
          if "epoch" in h.columns else np.arange(1, len(h) + 1, dtype=float))
    num = lambda col: pd.to_numeric(h[col], errors="coerce").to_numpy(float)  # noqa: E731
    faint = {} if main else {"alpha": 0.35, "linewidth": 0.6}
    tag = "" if main or seed is None else "_"  # matplotlib leaves '_' labels out of legends
    drawn = []
    if kind == "loss":
        for col, ls in (("loss", "-"), ("val_loss", "--")):
            if _has(h, col):
                drawn += ax.plot(ep, num(col), ls, color="black",
                                 **({"linewidth": 0.9} | faint),
                                 label=tag + "total" + (" (val)" if ls == "--" else ""))
        if main:
            for kind_l, ls in (("train", "-"), ("val", "--")):
                for lv, col in _levels(h, kind_l).items():
                    drawn += ax.plot(ep, num(col), ls, linewidth=0.8,
                                     color=_level_color(lv, n_levels),
                                     label=f"level {lv}" + (" (val)" if kind_l == "val" else ""))
    elif kind == "error":
        name = "validation" if seed is None else f"validation, seed {seed}"
        if _has(h, "val_error_mm"):
            line = ax.plot(ep, num("val_error_mm"), color=method_color(method),
                           **({"linewidth": 1.0} | ({"alpha": 0.45, "linewidth": 0.7}
                                                     if not main else {})),
                           label=name)
            drawn += line
            if kept is not None and seed is not None:
                at = ep == kept
                ax.plot(ep[at], num("val_error_mm")[at], "o", markersize=2.2,
                        color=method_color(method), markeredgecolor="black",
                        markeredgewidth=0.3, label="_kept")
        if main and _has(h, "error_mm"):
            drawn += ax.plot(ep, num("error_mm"), "--", color=method_color(method),
                             alpha=0.7, label="training")
    elif main:
        for lv, col in _levels(h, "weight").items():
            drawn += ax.plot(ep, num(col), color=_level_color(lv, n_levels),
                             label=f"level {lv}")
    return drawn


def training_curves(
    histories: Mapping[str, pd.DataFrame],
    out_prefix: str | os.PathLike,
    width_in: float = PAGE_WIDTH_IN,
    row_height_in: float = 1.45,
) -> list[Path]:
    """Training curves: one row per method (Table 1 order), up to three panels per row.

    * Loss: ``loss`` (black) and ``val_loss`` (black, dashed), per-level ``loss_level{l}``
      (solid) and ``val_loss_level{l}`` (dashed), one colour per level; log scale when all
      values are positive.
    * Validation error: ``val_error_mm`` (and the training ``error_mm`` if logged), with the
      kept epoch (lowest ``val_score_mm``, the model-selection score) marked by a dotted line
      in every panel of the row.
    * Loss weights: the schedule ``weight_level{l}``.

    Several training seeds (the runs one below the other with a ``seed`` column): the lowest
    seed is drawn in full; the other seeds add their validation error (labelled per seed, a
    dot at each seed's kept epoch) and faint total losses.

    The x axis is the ``epoch`` column (else the row number + 1). Missing columns are
    tolerated: a panel kind no method logged is dropped; an empty panel says "not logged".
    """
    order = method_order(histories)
    all_levels = sorted({lv for m in order for k in _LEVEL_RE for lv in _levels(histories[m], k)})
    n_levels = max(all_levels) + 1 if all_levels else 1
    kinds = []
    if any(_has(h, "loss") or _has(h, "val_loss") or _levels(h, "train") or _levels(h, "val")
           for h in histories.values()):
        kinds.append("loss")
    if any(_has(h, "val_error_mm") or _has(h, "error_mm") for h in histories.values()):
        kinds.append("error")
    if any(_levels(h, "weight") for h in histories.values()):
        kinds.append("weight")
    with mpl.rc_context(_RC):
        if not order or not kinds:
            fig = _new_figure(width_in, 1.5)
            _empty_message(fig.add_subplot(), "no training history logged")
            return save_figure(fig, out_prefix)
        fig = _new_figure(width_in, 0.35 + row_height_in * len(order))
        axes = np.atleast_2d(fig.subplots(len(order), len(kinds), squeeze=False))
        for r, m in enumerate(order):
            runs = seed_tables(histories[m])
            first = min(runs)
            kept = {sd: _kept_epoch(h.reset_index(drop=True)) for sd, h in runs.items()}
            for c, kind in enumerate(kinds):
                ax = axes[r, c]
                drawn = []
                for sd, h in runs.items():
                    # the lowest seed in full; the others' curves faint and unlabelled
                    drawn += _history_lines(ax, kind, h.reset_index(drop=True), m, n_levels,
                                            main=sd == first, seed=sd if len(runs) > 1 else None,
                                            kept=kept[sd])
                if kind == "loss":
                    vals = np.concatenate([ln.get_ydata() for ln in drawn]) if drawn else []
                    vals = np.asarray(vals, float)
                    if drawn and np.all(vals[np.isfinite(vals)] > 0):
                        ax.set_yscale("log")
                        ax.autoscale_view()
                        _plain_log_axis(ax.yaxis)
                    ax.set_ylabel("Loss")
                elif kind == "error":
                    ax.set_ylabel("Mean error (mm)")
                else:
                    ax.set_ylabel("Loss weight")
                    if drawn:
                        ax.set_ylim(-0.05, 1.05 * max(1.0, np.nanmax(
                            [np.nanmax(ln.get_ydata()) for ln in drawn])))
                if not drawn:
                    _empty_message(ax, "not logged")
                    continue
                if kept[first] is not None:
                    ax.axvline(kept[first], color="0.5", linestyle=":", linewidth=0.7)
                labelled = [ln for ln in drawn if not ln.get_label().startswith("_")]
                if len(labelled) > 1:
                    ax.legend(handles=labelled, frameon=False, fontsize=5,
                              ncol=2 if len(labelled) > 4 else 1, handlelength=1.5,
                              columnspacing=0.8, labelspacing=0.2)
                if r == len(order) - 1:
                    ax.set_xlabel("Epoch")
                ax.grid(linewidth=0.3, color="0.9")
            axes[r, 0].set_title(_fit_width(method_label(m), width_in / len(kinds) - 0.3, 7.5),
                                 loc="left", fontweight="bold")
        return save_figure(fig, out_prefix)


# ---------------------------------------------------------------------------------------------
# Fig. 3: one test case with the output maps
# ---------------------------------------------------------------------------------------------


def _grid(affine_or_spacing, shape) -> tuple[np.ndarray, np.ndarray]:
    """(spacing, origin) of an axis-aligned grid; origin = world position of voxel (0,0,0)."""
    a = np.asarray(affine_or_spacing, dtype=float)
    if a.shape == (4, 4):
        lin = a[:3, :3]
        off = lin - np.diag(np.diag(lin))
        if np.abs(off).max() > 1e-6 * np.abs(lin).max() or np.any(np.diag(lin) <= 0):
            raise ValueError("heatmap_figure needs an axis-aligned grid with a positive "
                             "diagonal affine (the pyramid's RAS grids)")
        return np.diag(lin).copy(), a[:3, 3].copy()
    if a.size in (1, 3):
        sp = np.broadcast_to(a.ravel(), (3,)).astype(float)
        if np.any(sp <= 0):
            raise ValueError("spacing must be positive")
        return sp, np.zeros(3)
    raise ValueError(f"affine_or_spacing must be a 4x4 affine or 1/3 spacings, got {a.shape}")


_VIEWS = ("sagittal", "axial")
#: edge letters of a slice (left, right, top, bottom): sagittal anterior (+y) on the left,
#: axial the patient's right (+x) on the left (radiological)
_EDGE_LETTERS = {"sagittal": ("A", "P", "S", "I"), "axial": ("R", "L", "A", "P")}


def _as_3d(arr, what: str) -> np.ndarray:
    """``arr`` as a float 3D array (a trailing axis of length 1 dropped)."""
    a = np.asarray(arr, dtype=float)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"{what} must be 3D, got shape {a.shape}")
    return a


def _display_window(vol: np.ndarray) -> tuple[float, float]:
    """The 1st-99.5th percentiles of the finite values (a range of at least 1)."""
    finite = vol[np.isfinite(vol)]
    window = tuple(np.percentile(finite, [1.0, 99.5])) if finite.size else (0.0, 1.0)
    if window[1] <= window[0]:
        window = (window[0], window[0] + 1.0)
    return window


@dataclass
class _SliceFigure:
    """What every panel of :func:`heatmap_figure` needs: the volume's grid (``sp``, ``org``),
    the outer boundary of its field of view, the world point the slices pass through and the
    overlays ``(title, map, spacing, origin)``."""

    vol: np.ndarray
    sp: np.ndarray
    org: np.ndarray
    lo_edge: np.ndarray
    hi_edge: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    c_w: np.ndarray
    maps: list
    window: tuple
    crop_mm: float | None
    map_alpha: float
    width_in: float

    def to_world(self, v):
        return self.org + self.sp * v

    def slab(self, arr, a_sp, a_org, view):
        """2D slice (rows = vertical axis) and its extent, through world point c_w."""
        ax_fix = 0 if view == "sagittal" else 2
        idx = int(np.clip(np.round((self.c_w[ax_fix] - a_org[ax_fix]) / a_sp[ax_fix]), 0,
                          arr.shape[ax_fix] - 1))
        sl = arr[idx, :, :] if view == "sagittal" else arr[:, :, idx]
        h, v = (1, 2) if view == "sagittal" else (0, 1)   # horizontal / vertical world axis
        lo, hi = self.lo_edge, self.hi_edge
        return sl.T, [lo[h], hi[h], lo[v], hi[v]], h, v

    def height_ratios(self) -> list[float]:
        """Height / width of each row's (cropped) slices."""
        ratios = []
        for view in _VIEWS:
            _, ext, _, _ = self.slab(self.vol, self.sp, self.org, view)
            wv, hv = ext[1] - ext[0], ext[3] - ext[2]
            if self.crop_mm:
                wv, hv = min(wv, 2 * self.crop_mm), min(hv, 2 * self.crop_mm)
            ratios.append(hv / wv)
        return ratios


def _slice_figure(volume, affine_or_spacing, truth_vox, pred_vox, locnet_map, heatmap_map,
                  window, crop_mm, map_alpha, width_in) -> _SliceFigure:
    """Check the inputs of :func:`heatmap_figure` and work out the geometry of its panels."""
    vol = _as_3d(volume, "volume")
    sp, org = _grid(affine_or_spacing, vol.shape)
    shape = np.array(vol.shape, dtype=float)
    lo_edge = org - sp / 2.0                      # outer boundary of the field of view
    hi_edge = org + sp * (shape - 0.5)
    truth = np.asarray(truth_vox, dtype=float).reshape(3)
    pred = np.asarray(pred_vox, dtype=float).reshape(3)
    centre = truth if np.all(np.isfinite(truth)) else pred
    if not np.all(np.isfinite(centre)):
        raise ValueError("need a finite truth or prediction to choose the slices")
    maps = []
    locnet_method, heatmap_method = HEATMAP_FIGURE
    for title, mp in ((method_label(locnet_method) + " map", locnet_map),
                      (method_label(heatmap_method), heatmap_map)):
        if mp is None:
            continue
        mp = _as_3d(mp, "output maps")
        msp = (hi_edge - lo_edge) / np.array(mp.shape, dtype=float)
        maps.append((title, mp, msp, lo_edge + msp / 2.0))
    if window is None:
        window = _display_window(vol)
    return _SliceFigure(vol=vol, sp=sp, org=org, lo_edge=lo_edge, hi_edge=hi_edge, truth=truth,
                        pred=pred, c_w=org + sp * centre, maps=maps, window=window,
                        crop_mm=crop_mm, map_alpha=map_alpha, width_in=width_in)


def _draw_overlay(ax, sf: _SliceFigure, c: int, r: int, view: str, ext) -> None:
    """Column ``c``'s output map over the image, opacity growing with the value."""
    title, mp, msp, morg = sf.maps[c - 1]
    mimg, _, _, _ = sf.slab(mp, msp, morg, view)
    mx = np.nanmax(mimg) if np.isfinite(mimg).any() else 0.0
    norm = np.clip(np.nan_to_num(mimg) / mx, 0, 1) if mx > 0 else \
        np.zeros_like(mimg)
    rgba = mpl.colormaps["inferno"](norm)
    rgba[..., 3] = sf.map_alpha * np.sqrt(norm)
    ax.imshow(rgba, origin="lower", extent=ext, interpolation="nearest",
              aspect="equal")
    if r == 0:
        ax.set_title(_fit_width(title, sf.width_in / (1 + len(sf.maps)) - 0.2, 7))


def _draw_marks(ax, sf: _SliceFigure, h: int, v: int, halo) -> None:
    """The truth (``+``, cyan) and the prediction (``x``, red), projected onto the slice."""
    if np.all(np.isfinite(sf.truth)):
        tw = sf.to_world(sf.truth)
        ax.plot(tw[h], tw[v], "+", color="#00E5FF", markersize=7,
                markeredgewidth=1.3, path_effects=halo)
    if np.all(np.isfinite(sf.pred)):
        pw = sf.to_world(sf.pred)
        ax.plot(pw[h], pw[v], "x", color="#FF3030", markersize=5,
                markeredgewidth=1.3, path_effects=halo)


def _frame_slice(ax, sf: _SliceFigure, view: str, ext, h: int, v: int) -> None:
    """Limits (cropped around the slice centre), no ticks, the edge letters."""
    c_w, crop_mm = sf.c_w, sf.crop_mm
    xl, yl = (ext[0], ext[1]), (ext[2], ext[3])
    if crop_mm:
        xl = (max(xl[0], c_w[h] - crop_mm), min(xl[1], c_w[h] + crop_mm))
        yl = (max(yl[0], c_w[v] - crop_mm), min(yl[1], c_w[v] + crop_mm))
    # sagittal: anterior (+y) on the left; axial: patient's right (+x) on the left
    ax.set_xlim(xl[1], xl[0])
    ax.set_ylim(*yl)
    ax.set_xticks([])
    ax.set_yticks([])
    left, right, top, bottom = _EDGE_LETTERS[view]
    for s, (x, y, ha, va) in {left: (0.02, 0.5, "left", "center"),
                              right: (0.98, 0.5, "right", "center"),
                              top: (0.5, 0.98, "center", "top"),
                              bottom: (0.5, 0.02, "center", "bottom")}.items():
        ax.text(x, y, s, transform=ax.transAxes, ha=ha, va=va, color="white",
                fontsize=6, fontweight="bold")


def _draw_slice_panel(ax, sf: _SliceFigure, r: int, c: int, view: str, img, ext, h: int,
                      v: int, halo) -> None:
    """One panel: row ``r`` (``view``), column ``c`` (0: the image alone, else a map)."""
    ax.imshow(img, cmap="gray", origin="lower", extent=ext, vmin=sf.window[0],
              vmax=sf.window[1], interpolation="nearest", aspect="equal")
    if c > 0:
        _draw_overlay(ax, sf, c, r, view, ext)
    elif r == 0:
        ax.set_title("Image")
    _draw_marks(ax, sf, h, v, halo)
    _frame_slice(ax, sf, view, ext, h, v)
    if c == 0:
        ax.set_ylabel(view.capitalize())


def _heatmap_heading(sf: _SliceFigure, landmark_name: str, case_id: str | None) -> str:
    err = (float(np.linalg.norm(sf.sp * (sf.pred - sf.truth)))
           if np.all(np.isfinite(sf.truth)) and np.all(np.isfinite(sf.pred)) else np.nan)
    head = f"{landmark_name.replace('_', ' ')}"
    if case_id is not None:
        head = f"{case_id}: {head}"
    if np.isfinite(err):
        head += f", error {err:.2f} mm"
    head += "  (+ truth, × prediction)"
    return head


def heatmap_figure(
    volume: np.ndarray,
    affine_or_spacing,
    truth_vox,
    pred_vox,
    locnet_map: np.ndarray | None,
    heatmap_map: np.ndarray | None,
    out_prefix: str | os.PathLike,
    landmark_name: str,
    *,
    case_id: str | None = None,
    window: tuple[float, float] | None = None,
    crop_mm: float | None = None,
    map_alpha: float = 0.75,
    width_in: float = PAGE_WIDTH_IN,
) -> list[Path]:
    """Fig. 3: sagittal and axial slices of one case through the landmark, with output maps.

    Columns: the image with the truth (``+``, cyan) and the prediction (``x``, red); the same
    slices with the single-scale Loc-Net output map overlaid; with the heatmap U-Net output map
    overlaid (a column is dropped when its map is None). Rows: sagittal and axial slices
    through the true landmark (through the prediction when the truth is missing); the
    prediction is projected onto the slice.

    Grid conventions: ``volume`` is indexed ``[i, j, k]`` on an axis-aligned grid given by its
    4x4 affine (positive diagonal, world RAS mm) or by its spacing (mm; then coordinates are
    mm from voxel (0,0,0)). ``truth_vox`` and ``pred_vox`` are (float) voxel coordinates of
    ``volume``. The maps need *not* be resampled: a map of another shape is taken to cover the
    same field of view as ``volume`` (true for any two levels of the pyramid, whose grids share
    their outer boundary), so its spacing is ``spacing * volume.shape / map.shape``. Slices
    are drawn in physical millimetres with equal aspect, so anisotropic spacing is shown
    correctly. Axial: patient's right on the viewer's left (radiological), anterior up;
    sagittal: anterior left, superior up; edge letters say so. Each overlay is normalised to
    its maximum within the slice, and its opacity grows with the value (zero is transparent).
    ``window`` is the display range of ``volume`` (default: its 1st-99.5th percentiles);
    ``crop_mm`` zooms to +-crop_mm around the slice centre.
    """
    sf = _slice_figure(volume, affine_or_spacing, truth_vox, pred_vox, locnet_map, heatmap_map,
                       window, crop_mm, map_alpha, width_in)
    ncols = 1 + len(sf.maps)
    ratios = sf.height_ratios()
    height_in = width_in / ncols * sum(ratios) + 0.5
    halo = [patheffects.withStroke(linewidth=2.2, foreground="black")]
    with mpl.rc_context({**_RC, "axes.spines.top": True, "axes.spines.right": True}):
        fig = _new_figure(width_in, height_in)
        axes = fig.subplots(2, ncols, squeeze=False, height_ratios=ratios)
        for r, view in enumerate(_VIEWS):
            img, ext, h, v = sf.slab(sf.vol, sf.sp, sf.org, view)
            for c in range(ncols):
                _draw_slice_panel(axes[r, c], sf, r, c, view, img, ext, h, v, halo)
        fig.suptitle(_fit_width(_heatmap_heading(sf, landmark_name, case_id), width_in - 0.2, 7),
                     fontsize=7)
        return save_figure(fig, out_prefix)


# ---------------------------------------------------------------------------------------------
# Overlay of one new scan (locnet predict, rule infer)
# ---------------------------------------------------------------------------------------------
_OVERLAY_COLORS = ("#ff7f0e", "#1f9bff", "#2ca02c", "#d62728", "#9467bd", "#e377c2")


def write_overlay(result, path, dpi: int = 72) -> None:
    """Three orthogonal slices of the model's finest grid through each predicted landmark of
    ``result`` (a :class:`locnet.inference.ScanResult`).

    One row per landmark (axial, coronal, sagittal; radiological display: patient right on
    the left), axes in world RAS mm with equal aspect; the point and, for noisy models, its
    90% confidence ellipse (the axis-aligned ellipsoid ``chi2_3(0.90)`` Mahalanobis radius,
    projected on the plane: semi-axes ``r * sd``) are drawn. Written atomically.
    """
    import matplotlib.pyplot as plt

    fig = overlay_figure(result)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def overlay_figure(result):
    """The figure of :func:`write_overlay` (a pyplot figure: close it when done).

    Any number of landmarks stays readable: each row is 2.6 in high whatever their number;
    more than 6 landmarks get 20 distinct colours (tab20); long names and the list of flagged
    landmarks in the title are wrapped to the figure's width.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    grid, vol = result.grid, np.asarray(result.level0)
    s0, n = grid.spacing, grid.shape
    o = np.asarray(grid.origin, dtype=np.float64)
    lo, hi = o - s0 / 2.0, o + s0 * (n - 0.5)
    r = float(np.sqrt(chi2_radius_sq(result.confidence)))
    k_n = len(result.landmarks)
    colors = (_OVERLAY_COLORS if k_n <= len(_OVERLAY_COLORS)
              else [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab20"].colors])
    fig, axes = plt.subplots(k_n, 3, figsize=(7.5, 2.6 * k_n), squeeze=False,
                             layout="constrained")
    # (name, horizontal axis, vertical axis, slicing axis)
    planes = (("axial", 0, 1, 2), ("coronal", 0, 2, 1), ("sagittal", 1, 2, 0))
    letters = {0: ("L", "R"), 1: ("P", "A"), 2: ("I", "S")}
    for k, name in enumerate(result.landmarks):
        p = result.world[k]
        idx = np.clip(np.rint((p - o) / s0).astype(int), 0, n - 1)
        color = colors[k % len(colors)]
        for c, (pname, a, b, cut) in enumerate(planes):
            ax = axes[k, c]
            sl = np.take(vol, idx[cut], axis=cut)  # remaining axes in order (a, b)
            ax.imshow(sl.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0,
                      extent=(lo[a], hi[a], lo[b], hi[b]), interpolation="nearest")
            if a == 0:
                ax.invert_xaxis()  # radiological: patient right on the viewer's left
            ax.set_aspect("equal")
            ax.plot(p[a], p[b], "+", color=color, ms=10, mew=1.5)
            if result.sd is not None and np.all(np.isfinite(result.sd[k])):
                ax.add_patch(Ellipse((p[a], p[b]), 2 * r * result.sd[k, a],
                                     2 * r * result.sd[k, b], fill=False, color=color, lw=1.2))
            ax.set_title(textwrap.fill(f"{name}: {pname} {'xyz'[cut]}={p[cut]:.0f} mm", 38,
                                       break_on_hyphens=False), fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlabel(f"{'xyz'[a]} (mm, {letters[a][1]}+)", fontsize=6)
            ax.set_ylabel(f"{'xyz'[b]} (mm, {letters[b][1]}+)", fontsize=6)
    # flags: a count per flag; the landmarks named for every flag but "ok"
    flagged = [(n, f) for n, f in zip(result.landmarks, result.flags) if f]
    head = str(result.case_id)
    if result.sd is not None:
        head += f"  ellipses: {100 * result.confidence:g}% confidence"
    if flagged:
        parts = []
        for f in dict.fromkeys(f for _, f in flagged):
            names = [n for n, g in flagged if g == f]
            parts.append(f"{f}: {len(names)} of {k_n}"
                         + ("" if f == "ok" else " (" + ", ".join(names) + ")"))
        head += "\n" + "; ".join(parts)
    fig.suptitle("\n".join(textwrap.fill(line, 100, break_on_hyphens=False)
                           for line in head.split("\n")), fontsize=8)
    return fig


