"""PNG charts for the CLI and the benchmark report (matplotlib, drawn off-screen with Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("charts need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(histories: Sequence, path: str | Path, title: str = "") -> Path:
    """Training loss per step and per epoch, test loss and test accuracy per epoch, one line per
    :class:`fused_resnet.training.History` (fused and, with ``--compare``, unfused)."""
    plt = _pyplot()
    fig, (ax_step, ax_loss, ax_acc) = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {True: {"color": "tab:red", "label": "fused"}, False: {"color": "tab:blue", "label": "nn (unfused)"}}
    for h in histories:
        style = styles[h.fused]
        dashed = {"linestyle": "--"} if not h.fused and len(histories) > 1 else {}
        epochs = range(1, len(h.epoch_loss) + 1)
        ax_step.plot(range(1, len(h.step_loss) + 1), h.step_loss, linewidth=0.8, **style, **dashed)
        ax_loss.plot(epochs, h.epoch_loss, marker="o", **{**style, "label": f"{style['label']}: train"}, **dashed)
        ax_loss.plot(epochs, h.test_loss, marker="s", alpha=0.6, **{**style, "label": f"{style['label']}: test"},
                     **dashed)
        ax_acc.plot(epochs, [100 * a for a in h.test_accuracy], marker="o", **style, **dashed)
    ax_step.set(xlabel="step", ylabel="training loss (batch)", yscale="log", title="loss per step")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss per epoch")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_step, ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)


def grouped_bars(cases: Sequence[str], series: dict[str, Sequence[float | None]], path: str | Path, *,
                 ylabel: str, title: str = "", reference_line: float | None = None, log_scale: bool = False) -> Path:
    """Horizontal grouped bars: one group per case, one bar per series (missing values skipped);
    ``log_scale``: a base-2 axis when the values span more than 8x."""
    plt = _pyplot()
    n_series = max(1, len(series))
    height = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(11, max(3.0, 0.1 * len(cases) * n_series + 1.5)))
    for i, (name, values) in enumerate(series.items()):
        ys = [c + (i - (n_series - 1) / 2) * height for c in range(len(cases))]
        pairs = [(y, v) for y, v in zip(ys, values) if v is not None]
        if pairs:
            # Bars start at the reference (1x): slower variants extend left of it, faster ones right.
            base = reference_line or 0.0
            ax.barh([p[0] for p in pairs], [p[1] - base for p in pairs], left=base, height=height, label=name)
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels(cases, fontsize=8)
    ax.set_ylim(len(cases) - 0.5, -0.5)  # first case on top, no padding
    shown = [v for values in series.values() for v in values if v]
    if log_scale and shown and max(shown) / min(shown) > 8:
        ax.set_xscale("log", base=2)  # ratios: 0.5x and 2x equally far from 1x
    if reference_line is not None:
        ax.axvline(reference_line, color="black", linewidth=0.8)
    ax.set_xlabel(ylabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    """Lay out, write ``fig`` as PNG to ``path`` (creating its folder) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
