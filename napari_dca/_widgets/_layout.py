"""Layout helpers: docks that scroll instead of forcing the window taller, and plots drawn in
napari's theme colours."""
from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QComboBox, QFormLayout, QFrame, QPushButton, QScrollArea, QSizePolicy, QVBoxLayout,
                            QWidget)

DOCK_MIN_WIDTH = 250   # narrow enough that the canvas keeps 60% of a 1600 px window
DOCK_WIDTH = 340       # what launch gives the dock area


def scrolling(widget: QWidget, inner) -> QScrollArea:
    """Puts layout `inner` into a vertical scroll area filling `widget`: a tall dock scrolls,
    it never makes the main window taller than the screen."""
    content = QWidget()
    content.setLayout(inner)
    for combo in content.findChildren(QComboBox):  # long layer names must not widen the dock
        combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(6)
    for form in content.findChildren(QFormLayout):  # labels above fields when the dock is narrow
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        form.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
    for button in content.findChildren(QPushButton):
        button.setMinimumWidth(0)
        button.setSizePolicy(QSizePolicy.Ignored, button.sizePolicy().verticalPolicy())
    area = QScrollArea()
    area.setWidget(content)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)  # never clip: scroll if ever needed
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    widget.setMinimumWidth(DOCK_MIN_WIDTH)
    widget.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Ignored)  # height comes from the dock
    return area


def theme_colors(viewer) -> dict:
    """Background, foreground (text) and highlight colours of the viewer's napari theme, as hex."""
    fallback = {"background": "#262930", "foreground": "#f0f1f2", "highlight": "#6c91e0",
                "secondary": "#86898f"}
    try:
        from napari.utils.theme import get_theme
        theme = get_theme(getattr(viewer, "theme", "dark"))
        def hexa(c):
            return c.as_hex() if hasattr(c, "as_hex") else str(c)
        return {"background": hexa(theme.background), "foreground": hexa(theme.text),
                "highlight": hexa(theme.current), "secondary": hexa(theme.secondary)}
    except Exception:
        return fallback


def style_axes(ax, colors: dict) -> None:
    """Axes, ticks and labels of a matplotlib plot in the theme's colours (no white box)."""
    ax.set_facecolor(colors["background"])
    for spine in ax.spines.values():
        spine.set_color(colors["secondary"])
    ax.tick_params(colors=colors["foreground"], labelsize=7)
    ax.xaxis.label.set_color(colors["foreground"])
    ax.yaxis.label.set_color(colors["foreground"])
    ax.title.set_color(colors["foreground"])
