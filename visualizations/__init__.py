"""Plots and the study report; they read logs/ and results/ and never run a model."""

from __future__ import annotations

from pathlib import Path


def save_figures(figures: dict, out_dir: str | Path, dpi: int = 120) -> list[Path]:
    """Write each {file name: matplotlib figure} as a PNG under ``out_dir`` and free the figure."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=dpi)
        plt.close(fig)
        paths.append(out / name)
    return paths
