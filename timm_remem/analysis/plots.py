"""Matplotlib figures for the analysis results, built with the Figure API (no pyplot, no global backend change).

``plot_*`` functions save the figure as PNG at ``path`` (when given); matplotlib is imported only when a plot is
made (``pip install timm-remem[demo]``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_file
from ..errors import ConfigError

__all__ = [
    "demo_figure",
    "plot_demo",
    "plot_expertness",
    "plot_information_plane",
    "plot_layer_dynamics",
    "plot_pruning",
    "plot_select",
    "plot_study",
    "select_figure",
    "study_figure",
]

_log = logging.getLogger(__name__)
_MISSING = "matplotlib is not installed: no plot written (pip install timm-remem[demo])"


def _figure(ncols: int = 1, width: float = 5.0, height: float = 4.0) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a declared extra
        raise ImportError("plots need matplotlib: pip install 'timm-remem[demo]'") from err
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save_png(build: Callable[[], Any], path: str | os.PathLike) -> Path | None:
    """``build()``'s figure saved at ``path``, or ``None`` (with a warning naming the extra) without matplotlib."""
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        _log.warning(_MISSING)
        return None
    _save(build(), path)
    return Path(path)


def _integer_colorbar(fig: Any, mappable: Any, ax: Any, n: int, label: str) -> None:
    """A colour bar over ``n`` ordered items with integer ticks only (at most ~10)."""
    fig.colorbar(mappable, ax=ax, label=label).set_ticks(list(range(0, n, max(1, -(-n // 10)))))


def _save(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:  # written aside and renamed into place: a symlink at ``path`` is replaced, never followed
        fmt = Path(path).suffix.lstrip(".").lower() or "png"
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt), fsync=False)
    return fig


def plot_information_plane(
    points: Sequence[Any], path: str | os.PathLike | None = None, *, mi: str = "i_xf", title: str | None = None
) -> Any:
    """Teacher error (x) against mutual information (y), one labelled point per checkpoint, joined in order.

    Args:
        points: :class:`~timm_remem.analysis.information.TeacherInformation` items (or dicts with the same keys),
            e.g. from :func:`~timm_remem.analysis.information.information_plane`.
        mi: Which quantity on the y axis: ``"i_xf"``, ``"i_fy"`` or ``"i_xf_given_y"``.

    Example:
        >>> from timm_remem.analysis.information import TeacherInformation
        >>> p = TeacherInformation(2.0, 1.0, 1.0, 0.9, 2.3, 100, 10, "logits", "gaussian", 0.1, "chain", "ep1")
        >>> fig = plot_information_plane([p])
    """
    if mi not in ("i_xf", "i_fy", "i_xf_given_y"):
        raise ConfigError(f"mi must be 'i_xf', 'i_fy' or 'i_xf_given_y', got {mi!r}.")
    rows = [p if isinstance(p, dict) else p.to_dict() for p in points]
    if not rows:
        raise ConfigError("no points to plot; pass at least one teacher_information result.")
    xs = [r.get("error") for r in rows]
    if any(x is None for x in xs):
        raise ConfigError("every point needs an error (measure with a labelled loader) to be placed on the plane.")
    ys = [r[mi] for r in rows]
    fig, (ax,) = _figure()
    ax.plot(xs, ys, "-", color="0.7", zorder=1)
    sc = ax.scatter(xs, ys, c=range(len(xs)), cmap="viridis", zorder=2)
    for i, r in enumerate(rows):
        ax.annotate(str(r.get("name") or i), (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("teacher error")
    label = {"i_xf": "I(X; F_T)", "i_fy": "I(F_T; Y)", "i_xf_given_y": "I(X; F_T | Y)"}[mi]
    ax.set_ylabel(f"{label} [nats]")
    ax.set_title(title or "Information plane")
    if len(xs) > 1:
        _integer_colorbar(fig, sc, ax, len(xs), "checkpoint (in order)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_layer_dynamics(dynamics: Any, path: str | os.PathLike | None = None, *, title: str | None = None) -> Any:
    """Token entropy, frequency intensity and activation magnitude per block, plus the spectrum, of a
    :class:`~timm_remem.analysis.dynamics.LayerDynamics` (or its ``to_dict()``).

    Example:
        >>> import timm, torch
        >>> from timm_remem.analysis.dynamics import layer_dynamics
        >>> model = timm.create_model("test_vit", pretrained=False, img_size=32)
        >>> fig = plot_layer_dynamics(layer_dynamics(model, torch.randn(2, 3, 32, 32)))
    """
    d = dynamics if isinstance(dynamics, dict) else dynamics.to_dict()
    layers = d["indices"]
    curves = [("entropy", "token entropy [bits]"), ("intensity", "frequency intensity"),
              ("magnitude", "mean |activation|")]
    if d.get("gradient") is not None:
        curves.append(("gradient", "mean |gradient|"))
    fig, axes = _figure(len(curves) + 1, width=3.6, height=3.2)
    for ax, (key, label) in zip(axes, curves, strict=False):
        ax.plot(layers, d[key], "o-")
        ax.set_xlabel("block")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    spectra = d["spectrum"]
    if len({len(s) for s in spectra}) == 1:
        img = np.asarray(spectra, dtype=float)
        half = img.shape[1] // 2 + 1  # the spectrum is symmetric: show 0..C/2
        im = ax.imshow(np.log10(img[:, :half] + 1e-12), aspect="auto", origin="lower", cmap="magma",
                       extent=(0, half - 1, layers[0] - 0.5, layers[-1] + 0.5))
        fig.colorbar(im, ax=ax, label="log10 amplitude")
        ax.set_ylabel("block")
    else:
        for layer, s in zip(layers, spectra, strict=True):
            ax.plot(s[: len(s) // 2 + 1], label=str(layer), lw=0.8)
        ax.set_yscale("log")
        ax.legend(fontsize=6, title="block")
    ax.set_xlabel("channel frequency")
    ax.set_title("channel spectrum", fontsize=10)
    fig.suptitle(title or f"Layer dynamics (entropy range: {d.get('entropy_range', 'global')})")
    return _save(fig, path)


def plot_pruning(result: Any, path: str | os.PathLike | None = None, *, title: str | None = None) -> Any:
    """Accuracy and ``I(X; F_T)`` against the number of pruned top blocks, MLP versus attention, of a
    :class:`~timm_remem.analysis.pruning.PruningResult` (or its ``to_dict()``).

    Example:
        >>> rows = [{"kind": "mlp", "k": 0, "accuracy": 0.9, "i_xf": 2.0}, {"kind": "mlp", "k": 1, "accuracy": 0.8,
        ...          "i_xf": 3.0}]
        >>> fig = plot_pruning({"num_blocks": 1, "rows": rows})
    """
    d = result if isinstance(result, dict) else result.to_dict()
    fig, axes = _figure(3, width=3.8, height=3.3)
    kinds = sorted({r["kind"] for r in d["rows"]})
    style = {"mlp": ("o-", "tab:red"), "attn": ("s--", "tab:blue")}
    for kind in kinds:
        rows = sorted((r for r in d["rows"] if r["kind"] == kind), key=lambda r: r["k"])
        fmt, color = style.get(kind, ("^-", None))
        ks = [r["k"] for r in rows]
        acc = [r.get("accuracy") for r in rows]
        mi = [r.get("i_xf") for r in rows]
        if all(a is not None for a in acc):
            axes[0].plot(ks, acc, fmt, color=color, label=kind)
            axes[2].plot([1 - a for a in acc], mi, fmt, color=color, label=kind)
        axes[1].plot(ks, mi, fmt, color=color, label=kind)
    axes[0].set(xlabel="top blocks pruned (k)", ylabel="accuracy", title="accuracy")
    axes[0].set_ylim(bottom=0)
    axes[1].set(xlabel="top blocks pruned (k)", ylabel="I(X; F_T) [nats]", title="mutual information")
    axes[2].set(xlabel="teacher error", ylabel="I(X; F_T) [nats]", title="information plane")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title or "Top-down pruning: MLP vs attention")
    return _save(fig, path)


def plot_expertness(blocks: Sequence[Any], path: str | os.PathLike | None = None, *, title: str | None = None) -> Any:
    """Edge density, neuron/input Gini, mean class selectivity and dead neurons per block of
    :class:`~timm_remem.analysis.expertness.BlockExpertness` items (or their ``summary()`` dicts).

    Example:
        >>> import torch
        >>> from timm_remem.analysis.expertness import neuron_statistics
        >>> fig = plot_expertness([neuron_statistics(torch.randn(10, 4))])
    """
    rows = [b if isinstance(b, dict) else b.summary() for b in blocks]
    if not rows:
        raise ConfigError("no blocks to plot; pass the result of mlp_expertness.")
    idx = [r["index"] for r in rows]
    fig, axes = _figure(2, width=4.2, height=3.4)
    axes[0].plot(idx, [r["density"] for r in rows], "o-", label="density (mean fire rate)")
    axes[0].plot(idx, [r["dead_fraction"] for r in rows], "x:", label="dead neurons")
    if all(r.get("mean_selectivity") is not None for r in rows):
        axes[0].plot(idx, [r["mean_selectivity"] for r in rows], "s-", label="class selectivity")
    axes[0].set(xlabel="block", ylim=(-0.02, 1.02), title="firing")
    axes[1].plot(idx, [r["neuron_gini"] for r in rows], "o-", label="neuron-degree Gini")
    axes[1].plot(idx, [r["input_gini"] for r in rows], "s--", label="input-degree Gini")
    axes[1].set(xlabel="block", ylim=(-0.02, 1.02), title="neuron-input graph")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "MLP expertness per block")
    return _save(fig, path)


def _text_block(fig: Any, lines: Sequence[str | None]) -> None:
    """Caveat and settings printed below the panels, wrapped to the figure's width."""
    import textwrap

    width = max(60, int(fig.get_figwidth() * 15))
    text = "\n".join(textwrap.fill(line, width) for line in lines if line)
    if text:
        fig.supxlabel(text, x=0.01, ha="left", fontsize=7.5, color="0.25")  # constrained layout makes room


def select_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """Student and teacher accuracy (axis from 0) per teacher checkpoint, the best starred: ``timm-remem select``'s.

    Args:
        rows: One mapping per checkpoint with ``checkpoint``, ``student_acc`` and ``teacher_acc``.

    Example:
        >>> fig = select_figure([{"checkpoint": "epoch-1", "student_acc": 0.5, "teacher_acc": 0.6}])
        >>> float(fig.axes[0].get_ylim()[0])
        0.0
    """
    fig, (ax,) = _figure(width=max(4.0, 0.9 * len(rows) + 2), height=3.4)
    names = [r["checkpoint"] for r in rows]
    ax.plot(names, [r["student_acc"] for r in rows], "o-", label="student (short distillation)")
    ax.plot(names, [r["teacher_acc"] for r in rows], "s--", label="teacher")
    best = max(range(len(rows)), key=lambda i: (rows[i]["student_acc"], -i))
    ax.plot([names[best]], [rows[best]["student_acc"]], "r*", markersize=14, label="best")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("teacher checkpoint")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Student accuracy per teacher checkpoint (select)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    for label in ax.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
    return fig


def plot_select(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path | None:
    """:func:`select_figure` saved as PNG at ``path``; ``None`` (and a warning) when matplotlib is missing.

    Example:
        >>> import os, tempfile
        >>> rows = [{"checkpoint": "epoch-1", "student_acc": 0.5, "teacher_acc": 0.6},
        ...         {"checkpoint": "epoch-2", "student_acc": 0.7, "teacher_acc": 0.8}]
        >>> out = plot_select(rows, os.path.join(tempfile.mkdtemp(), "select.png"))
        >>> out is None or os.path.isfile(out)
        True
    """
    return _save_png(lambda: select_figure(rows), path)


def demo_figure(rows: Sequence[Mapping[str, Any]], *, caveat: str | None = None, settings: str | None = None) -> Any:
    """Accuracy per stage (bars from 0, error bars when a row has ``*_low``/``*_high``) and wall time per stage.

    Args:
        rows: One mapping per stage with ``stage``, ``teacher_acc``, ``student_acc`` (``None`` for a teacher stage)
            and ``time_s``; optional ``student_acc_low``/``_high`` (or ``teacher_acc_low``/``_high``).
        caveat: Printed on the figure, as ``settings``.

    Example:
        >>> fig = demo_figure([{"stage": "teacher: plain", "teacher_acc": 0.9, "student_acc": None, "time_s": 2.0}],
        ...                   caveat="pipeline only")
        >>> [t.get_text() for t in fig.texts]
        ['pipeline only']
    """
    fig, (ax, bx) = _figure(2, width=5.2, height=4.2)
    names = [r["stage"] for r in rows]
    key = ["student_acc" if r.get("student_acc") is not None else "teacher_acc" for r in rows]
    acc = [r[k] for r, k in zip(rows, key, strict=True)]
    lows = [r.get(f"{k}_low") for r, k in zip(rows, key, strict=True)]
    highs = [r.get(f"{k}_high") for r, k in zip(rows, key, strict=True)]
    colors = ["tab:gray" if "teacher:" in n else "tab:blue" for n in names]
    yerr = None
    if all(v is not None for v in lows + highs):
        yerr = np.array([[a - lo for a, lo in zip(acc, lows, strict=True)],
                         [hi - a for a, hi in zip(acc, highs, strict=True)]])
    bars = ax.bar(range(len(rows)), acc, color=colors, yerr=yerr, capsize=4)
    for b, a in zip(bars, acc, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, 0.02, f"{a:.3f}", ha="center", va="bottom", fontsize=7, color="w")
    ax.set_ylim(0.0, 1.05)
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy: teachers (grey), students (blue)" + (", 95% CI" if yerr is not None else ""), fontsize=9)
    bx.barh(range(len(rows)), [r["time_s"] for r in rows], color=colors)
    bx.set_yticks(range(len(rows)), names, fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("wall time (s)")
    bx.set_title("Wall time per stage", fontsize=9)
    _text_block(fig, [caveat, settings])
    return fig


def plot_demo(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, caveat: str | None = None,
              settings: str | None = None) -> Path | None:
    """:func:`demo_figure` saved as PNG at ``path``; ``None`` (and a warning) when matplotlib is missing.

    Example:
        >>> import os, tempfile
        >>> rows = [{"stage": "teacher: plain", "teacher_acc": 0.9, "student_acc": None, "time_s": 2.0},
        ...         {"stage": "student <- plain teacher", "teacher_acc": 0.9, "student_acc": 0.8, "time_s": 1.0}]
        >>> out = plot_demo(rows, os.path.join(tempfile.mkdtemp(), "demo.png"))
        >>> out is None or os.path.isfile(out)
        True
    """
    return _save_png(lambda: demo_figure(rows, caveat=caveat, settings=settings), path)


def _err(entry: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """``(mean, half-width)`` of an interval dict (half-width 0 without an interval)."""
    if entry is None:
        return None
    return float(entry["mean"]), float(entry.get("half_width") or 0.0)


def study_figure(arms: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]], *,
                 caveat: str | None = None, settings: str | None = None) -> Any:
    """A study's panels: accuracy per arm (seeds as dots), the paired student difference against ``plain``, and
    ``I(X; F_T)`` against teacher accuracy, all with interval error bars.

    Args:
        arms: The ``arms`` of a :class:`~timm_remem.study.StudyResult` (interval dicts with ``mean`` and
            ``half_width``).
        runs: Its per-seed ``runs``.
        caveat: Printed on the figure, as ``settings``.

    Example:
        >>> iv = {"mean": 0.9, "half_width": 0.02}
        >>> arms = [{"arm": "plain", "teacher_acc": iv, "student_acc": iv, "mi": iv, "vs_plain": None}]
        >>> fig = study_figure(arms, [{"arm": "plain", "teacher_acc": 0.9, "student_acc": 0.9, "mi": 0.9}])
        >>> [ax.get_title()[:8] for ax in fig.axes]
        ['Accuracy', 'Student ', 'Informat']
    """
    fig, (ax, dx, mx) = _figure(3, width=4.4, height=4.0)
    names = [a["arm"] for a in arms]
    xs = np.arange(len(arms))
    for offset, metric, color, label in ((-0.2, "teacher_acc", "tab:gray", "teacher"),
                                         (0.2, "student_acc", "tab:blue", "student")):
        pts = [(i, *_err(a.get(metric))) for i, a in enumerate(arms) if a.get(metric) is not None]
        if pts:
            ax.bar([p[0] + offset for p in pts], [p[1] for p in pts], width=0.38, yerr=[p[2] for p in pts],
                   capsize=3, color=color, alpha=0.8, label=label)
        for r in runs:
            if r.get(metric) is not None and r["arm"] in names:
                ax.plot(names.index(r["arm"]) + offset, r[metric], "k.", markersize=3)
    ax.set_ylim(0.0, 1.05)
    ax.set_xticks(xs, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Accuracy per arm (mean, CI; dots: seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")

    diffs = [(i, *_err((a.get("vs_plain") or {}).get("student_acc"))) for i, a in enumerate(arms)
             if (a.get("vs_plain") or {}).get("student_acc") is not None]
    dx.axhline(0.0, color="0.4", lw=1)
    if diffs:
        dx.errorbar([d[0] for d in diffs], [d[1] for d in diffs], yerr=[d[2] for d in diffs], fmt="o", capsize=4,
                    color="tab:blue")
    dx.set_xticks(xs, names, rotation=25, ha="right", fontsize=8)
    dx.set_xlim(-0.5, len(arms) - 0.5)
    dx.set_ylabel("student accuracy - plain (paired by seed)")
    dx.set_title("Student accuracy minus plain (CI)", fontsize=9)
    dx.grid(alpha=0.3)

    for a in arms:
        t, m = _err(a.get("teacher_acc")), _err(a.get("mi"))
        if t is not None and m is not None:
            mx.errorbar([t[0]], [m[0]], xerr=[t[1]], yerr=[m[1]], fmt="o", capsize=3, label=a["arm"])
    for r in runs:
        if r.get("teacher_acc") is not None and r.get("mi") is not None:
            mx.plot(r["teacher_acc"], r["mi"], ".", color="0.6", markersize=3)
    mx.set_xlabel("teacher accuracy")
    mx.set_ylabel("I(X; F_T) [nats]")
    mx.set_title("Information plane of the arms (CI)", fontsize=9)
    mx.grid(alpha=0.3)
    if mx.has_data() and mx.get_legend_handles_labels()[0]:
        mx.legend(fontsize=7)
    _text_block(fig, [caveat, settings])
    return fig


def plot_study(arms: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
               caveat: str | None = None, settings: str | None = None) -> Path | None:
    """:func:`study_figure` saved as PNG at ``path``; ``None`` (and a warning) when matplotlib is missing.

    Example:
        >>> import os, tempfile
        >>> iv = {"mean": 0.9, "half_width": 0.02}
        >>> arms = [{"arm": "plain", "teacher_acc": iv, "student_acc": iv, "mi": None, "vs_plain": None}]
        >>> out = plot_study(arms, [], os.path.join(tempfile.mkdtemp(), "study.png"))
        >>> out is None or os.path.isfile(out)
        True
    """
    return _save_png(lambda: study_figure(arms, runs, caveat=caveat, settings=settings), path)
