"""The Fine-tune dock's loss curve: a matplotlib plot, or one line of text without matplotlib.

matplotlib is an optional extra (``napari-sgdc[all]``): a plugin-manager install may lack
it, and the dock must open anyway. Then the losses show as text: the first and last loss
and a sparkline of the recent steps.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

SPARKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 32
PLOT_HINT = "the loss as a plot needs matplotlib: pip install 'napari-sgdc[plot]'"


def loss_text(losses: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """``"loss 0.693 → 0.412 (16 steps) ▇▆▅▄▃▂▁"``: the run so far in one line (the sparkline
    shows the last `width` steps, lowest loss ▁, highest █)."""
    if not len(losses):
        return "fine-tune loss: no run yet"
    values = np.asarray(losses[-width:], dtype=float)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = np.zeros(len(values), int) if high <= low else np.rint(
        (values - low) / (high - low) * (len(SPARKS) - 1)).astype(int)
    spark = "".join(SPARKS[int(i)] for i in np.nan_to_num(scaled))
    steps = f"{len(losses)} step{'s' if len(losses) != 1 else ''}"
    return f"loss {losses[0]:.3f} → {losses[-1]:.3f} ({steps}) {spark}"


class LossPlot:
    """The loss of the running fine-tune, drawn into the dock.

    Attributes:
        widget: the Qt widget to add to the dock (a matplotlib canvas or a QLabel).
        axes: the matplotlib axes, or None in the text fallback.
    """

    def __init__(self) -> None:
        try:
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
            from matplotlib.figure import Figure
        except ImportError:  # the optional extra is not installed: text instead of a plot
            from qtpy.QtWidgets import QLabel

            self.axes = None
            self.widget: Any = QLabel(loss_text([]))
            self.widget.setObjectName("loss_text")
            self.widget.setWordWrap(True)
            self.widget.setToolTip(PLOT_HINT)
            return
        self.figure = Figure(figsize=(3.2, 2.0), dpi=100, tight_layout=True)
        self.axes = self.figure.add_subplot(1, 1, 1)
        self.widget = FigureCanvasQTAgg(self.figure)
        self.widget.setMinimumHeight(170)
        self.show([])

    @property
    def text(self) -> str:
        """What the text fallback shows ("" with a plot)."""
        return self.widget.text() if self.axes is None else ""

    def show(self, losses: Sequence[float]) -> None:
        """Draws `losses` (one per step)."""
        if self.axes is None:
            self.widget.setText(loss_text(losses))
            return
        axes = self.axes
        axes.clear()
        axes.set_xlabel("step", fontsize=8)
        axes.set_ylabel("loss", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_title("fine-tune loss", fontsize=9)
        if len(losses):
            axes.plot(np.arange(1, len(losses) + 1), losses, color="tab:orange", linewidth=1.2)
        self.widget.draw_idle()
