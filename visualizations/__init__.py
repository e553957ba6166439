"""Plots and the study report; they read logs/ and results/ and never run a model."""

from __future__ import annotations

from pathlib import Path


def write_tables(
    out: Path, note: str, headers: list[str], md_rows: list[list[str]], csv_header: list[str], csv_rows: list[list]
) -> tuple[Path, Path]:
    """``table.md`` (a note, then a Markdown table) and ``table.csv`` (machine-readable values) in ``out``."""
    import csv
    import io

    from common.files import atomic_write

    md = [note, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(row) + " |" for row in md_rows]
    atomic_write(out / "table.md", "\n".join(md) + "\n")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(csv_header)
    w.writerows(csv_rows)
    atomic_write(out / "table.csv", buf.getvalue())
    return out / "table.md", out / "table.csv"


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
