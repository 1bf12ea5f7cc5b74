"""The Fine-tune widget's live loss plot, painted by Qt in napari's theme colours.

matplotlib took 0.1-0.6 s of the GUI thread for every redraw of this small plot (laying out the
tick labels' text), which the user felt as the viewer freezing while fine-tuning. A polyline and
four numbers painted with QPainter take about a millisecond, and new values repaint it at most
four times a second.
"""
from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, QSize, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from ._layout import theme_colors


def _number(value: float) -> str:
    return f"{value:.3g}"


class LossPlot(QWidget):
    """Loss against step: the y axis spans the losses seen so far (its ends are labelled), the x
    axis the steps. Non-finite losses are left out of the line."""

    def __init__(self, viewer=None, parent=None):
        super().__init__(parent)
        self.colors = theme_colors(viewer)
        self.values: list[float] = []
        self.setMinimumHeight(110)
        self.setMaximumHeight(180)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        # each repaint of a widget composes napari's whole (OpenGL) window: ~10-60 ms
        self._repaint = QTimer(self)
        self._repaint.setSingleShot(True)
        self._repaint.setInterval(250)
        self._repaint.timeout.connect(self.update)

    def sizeHint(self) -> QSize:
        return QSize(270, 135)

    def clear(self) -> None:
        self.values = []
        self.update()

    def append(self, value: float) -> None:
        self.values.append(float(value))
        if not self._repaint.isActive():  # at most 4 repaints a second, whatever the step rate
            self._repaint.start()

    def paintEvent(self, event) -> None:
        painter = QPainter(self)
        try:
            self._paint(painter)
        finally:
            painter.end()

    def _paint(self, painter: QPainter) -> None:
        colors = {k: QColor(v) for k, v in self.colors.items()}
        painter.fillRect(self.rect(), colors["background"])
        font = painter.font()
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.85))
        painter.setFont(font)
        metrics = painter.fontMetrics()
        finite = [(i + 1, v) for i, v in enumerate(self.values) if math.isfinite(v)]
        lo, hi = (min(v for _, v in finite), max(v for _, v in finite)) if finite else (0.0, 1.0)
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # a flat line sits in the middle
            lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
        steps = max(len(self.values), 2)

        line_h = metrics.height()
        left = 6 + max(metrics.horizontalAdvance(_number(lo)), metrics.horizontalAdvance(_number(hi)),
                       metrics.horizontalAdvance("loss"))
        plot = QRectF(left + 4, line_h * 0.6, max(10.0, self.width() - left - 12),
                      max(10.0, self.height() - 2.2 * line_h))

        painter.setPen(QPen(colors["secondary"], 1))
        painter.drawLine(plot.bottomLeft(), plot.topLeft())
        painter.drawLine(plot.bottomLeft(), plot.bottomRight())
        painter.setPen(colors["foreground"])
        right_aligned = Qt.AlignRight | Qt.AlignVCenter
        painter.drawText(QRectF(0, plot.top() - line_h / 2, left, line_h), right_aligned,
                         _number(hi) if finite else "")
        painter.drawText(QRectF(0, plot.bottom() - line_h / 2, left, line_h), right_aligned,
                         _number(lo) if finite else "")
        painter.drawText(QRectF(0, plot.center().y() - line_h / 2, left, line_h), right_aligned, "loss")
        below = QRectF(plot.left(), plot.bottom() + 2, plot.width(), line_h)
        painter.drawText(below, Qt.AlignLeft | Qt.AlignTop, "1")
        painter.drawText(below, Qt.AlignHCenter | Qt.AlignTop, "step")
        painter.drawText(below, Qt.AlignRight | Qt.AlignTop, str(steps))
        if not finite:
            return

        def point(step: int, value: float) -> QPointF:
            x = plot.left() + (step - 1) / (steps - 1) * plot.width()
            y = plot.bottom() - (value - lo) / (hi - lo) * plot.height()
            return QPointF(x, y)

        painter.setRenderHint(QPainter.Antialiasing)
        painter.setPen(QPen(colors["highlight"], 1.5))
        if len(finite) == 1:
            painter.setBrush(colors["highlight"])
            painter.drawEllipse(point(*finite[0]), 2.0, 2.0)
            return
        painter.drawPolyline(QPolygonF([point(s, v) for s, v in envelope(finite, int(plot.width()))]))


def envelope(points: list[tuple[int, float]], columns: int) -> list[tuple[int, float]]:
    """`points` (step, loss) thinned to at most two per pixel column (its lowest and highest
    loss, in step order), so a long run paints as fast as a short one and keeps its spikes."""
    if len(points) <= 2 * max(columns, 1):
        return points
    per = len(points) / max(columns, 1)
    out = []
    for c in range(max(columns, 1)):
        chunk = points[int(c * per):int((c + 1) * per)]
        if chunk:
            low, high = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
            out += sorted({low, high})
    return out
