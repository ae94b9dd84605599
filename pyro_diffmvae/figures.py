"""PNG figures of a run: conditional generations, unconditional samples, reconstructions, loss curves."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["to_display", "figure_captions", "save_conditional_figure", "save_unconditional_figure", "save_loss_curves",
           "loss_curve_panels"]


def to_display(name: str, x: torch.Tensor) -> torch.Tensor | None:
    """A modality as (N, H, W, 3) floats in [0, 1] for plotting (None for text, shown as captions)."""
    x = x.detach().float().cpu()
    if x.dim() == 4 and x.shape[1] == 3:
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    if x.dim() == 4 and x.shape[1] == 1:
        return x.clamp(0, 1).permute(0, 2, 3, 1).expand(-1, -1, -1, 3)
    if x.dim() == 2 and x.dtype.is_floating_point:  # attribute vectors: a 1-row heat strip
        return x.clamp(0, 1)[:, None, :, None].expand(-1, 4, -1, 3)
    return None


def figure_captions(cfg, names: Sequence[str]) -> dict[str, Callable[[torch.Tensor], str]]:
    """``{modality: tokens -> str}`` of the token modalities of ``cfg.dataset`` whose spec can decode them."""
    from .data.registry import get_dataset

    specs = get_dataset(cfg).modalities(cfg)
    return {m: specs[m].decode for m in names if specs[m].decode is not None}


def _caption(x: torch.Tensor, i: int, decode: Callable[[torch.Tensor], str] | None) -> str:
    """Example ``i`` of a token modality as text: its data set's ``decode``, else the leading token ids."""
    if decode is not None:
        return decode(x[i])
    return " ".join(str(int(t)) for t in x[i][:12])


def _grid(rows: Sequence[tuple[str, Mapping[str, torch.Tensor]]], names: Sequence[str], n: int, path: Path, title: str,
          captions: Mapping[str, Callable] | None = None):
    cols = [(label, name) for label, data in rows for name in names if name in data]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.3 * len(cols), 1.3 * n), squeeze=False)
    for j, (label, name) in enumerate(cols):
        data = dict(rows)[label][name]
        shown = to_display(name, data)
        for i in range(n):
            ax = axes[i, j]
            ax.axis("off")
            if shown is not None:
                ax.imshow(shown[i].numpy(), interpolation="nearest", aspect="auto" if name == "attributes" else "equal")
            else:
                ax.text(0.0, 0.5, _caption(data, i, (captions or {}).get(name)), fontsize=5, wrap=True)
            if i == 0:
                ax.set_title(f"{label}\n{name}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_conditional_figure(truth: Mapping, generated: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str],
                            path: Path, n: int = 6, captions: Mapping[str, Callable] | None = None) -> None:
    """One row per test scene: the truth, then the generated modalities for every given subset.

    ``captions``: ``{modality: tokens -> str}``, how a token modality is shown (else its leading ids)."""
    n = min(n, next(iter(truth[m] for m in names)).shape[0])
    rows = [("truth", {m: truth[m] for m in names})] + [(f"given {g}", gen) for g, gen in generated.items()]
    _grid(rows, names, n, path, "Conditional generation (each column block: given subset → generated modalities)",
          captions)


def save_unconditional_figure(samples: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str], path: Path, n: int = 8,
                              captions: Mapping[str, Callable] | None = None) -> None:
    """Unconditional samples: N(0, I) beside the latent score prior (``captions``: as in
    :func:`save_conditional_figure`)."""
    if not samples:
        return
    n = min(n, next(iter(next(iter(samples.values())).values())).shape[0])
    label = {"normal": "z ~ N(0, I)", "score": "z ~ latent score prior"}
    _grid([(label[k], v) for k, v in samples.items()], names, n, path, "Unconditional generation", captions)


def loss_curve_panels(metrics_csv: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The series of Lightning's CSVLogger file grouped for plotting: ``{term: {split: [(step, value)]}}``.

    A column ``"<split>/<term>"`` (``train/loss``, ``val/loss``, ``train/loglik/image``, ...) goes to panel
    ``term`` as series ``split``, so training and validation of one term share a panel; a column
    without ``/`` is its own panel (split ``""``). A step logged twice keeps its last value."""
    panels: dict[str, dict[str, dict[int, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for column, value in row.items():
                if column in ("step", "epoch") or value in ("", None):
                    continue
                split, _, term = column.partition("/") if "/" in column else ("", "", column)
                panels.setdefault(term, {}).setdefault(split, {})[step] = float(value)
    return {term: {split: sorted(points.items()) for split, points in sorted(series.items())}
            for term, series in sorted(panels.items(), key=lambda item: (item[0] != "loss", item[0]))}


def save_loss_curves(metrics_csv: Path, path: Path, columns: int = 4) -> bool:
    """Plot :func:`loss_curve_panels` as a grid (``columns`` panels a row, the loss first), training
    and validation of each term on the same axes; False if the file has no series."""
    if not metrics_csv.exists():
        return False
    panels = loss_curve_panels(metrics_csv)
    if not panels:
        return False
    ncols = min(columns, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False)
    for ax, (term, series) in zip(axes.flat, panels.items()):
        for split, points in series.items():
            steps, values = zip(*points)
            ax.plot(steps, values, lw=1, marker="o" if len(points) < 30 else None, ms=2, label=split or term)
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
