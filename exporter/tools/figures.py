"""The matplotlib figures of the tools, shared by the routing pictures (``inspect_routing``) and the
capacity sweep (``sweep``): pyplot without a display, a grid of panels, titles wrapped to the
figure's width, and the PNG written atomically.

matplotlib is imported inside these functions only.
"""

from __future__ import annotations

from pathlib import Path

from exporter.fileio import atomic_path

MIN_FIGURE_WIDTH = 6.5  # inches: room for the title of a two-column picture


def pyplot():
    """``matplotlib.pyplot`` drawing to files (the Agg backend, unless one is already chosen)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def panel_grid(
    rows: int, cols: int, panel: tuple[float, float], dpi: int, top: float, bottom: float, right: float = 0.1
):
    """(figure, ``rows`` x ``cols`` axes) with panels of ``panel`` inches and ``top``, ``bottom`` and
    ``right`` inches of margin (the figure at least ``MIN_FIGURE_WIDTH`` wide)."""
    plt = pyplot()
    width, height = max(cols * panel[0] + 0.9, MIN_FIGURE_WIDTH), rows * panel[1] + top + bottom
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), dpi=dpi, squeeze=False)
    fig.subplots_adjust(
        left=0.9 / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=0.25,
        hspace=0.35,
    )
    return fig, axes


def wrap_title(fig, text: str) -> str:
    """Title lines wrapped to the figure's width (about 15 characters per inch at 9 pt)."""
    import textwrap

    width = int(fig.get_figwidth() * 15)
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def save_png(fig, dest: str | Path, dpi: int) -> tuple[int, int]:
    """Writes ``fig`` to the PNG ``dest`` atomically and closes it; returns the PNG's pixel size."""
    import matplotlib.pyplot as plt

    dest = Path(dest)
    try:
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
        width, height = fig.canvas.get_width_height()
    finally:
        plt.close(fig)
    return width, height
