"""GUI test of the docks on a small screen (finding 18): at 1366×768 both docks fit, each in a
scroll area that shows a scroll bar when its controls are taller than the room it has, and every
control can be scrolled into view."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui


def _controls(container):
    """Every visible leaf control of a magicgui container (button rows included)."""
    for widget in container:
        if hasattr(widget, "__iter__") and not hasattr(widget, "choices"):
            yield from _controls(widget)
        elif widget.visible:
            yield widget


def test_both_docks_fit_a_1366x768_window_and_scroll(make_napari_viewer, qtbot):
    from qtpy.QtCore import QPoint, QRect
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    _, segment = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, finetune = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    window.resize(1366, 768)
    qtbot.waitUntil(lambda: window.height() <= 768, timeout=5000)
    QApplication.processEvents()
    assert window.frameGeometry().height() <= 768 + 40 and window.width() <= 1366  # (+ a title bar)
    scrolled = 0
    for dock in (segment, finetune):
        scroll = dock.scroll
        assert scroll.widget().layout() is not None and dock.native.layout().itemAt(0).widget() is scroll
        assert scroll.mapTo(window, QPoint(0, scroll.height())).y() <= window.height()  # inside the window
        bar = scroll.verticalScrollBar()
        # the bar's range and visibility settle over a few layout passes (showing it narrows the content)
        qtbot.waitUntil(lambda: (bar.maximum() > 0) == bar.isVisible(), timeout=5000)
        content, room = scroll.widget().sizeHint().height(), scroll.viewport().height()
        assert (bar.maximum() > 0 and bar.isVisible()) == (content > room), (content, room)
        scrolled += content > room
        for control in _controls(dock):
            scroll.ensureWidgetVisible(control.native, 0, 0)
            QApplication.processEvents()
            top_left = control.native.mapTo(scroll.viewport(), QPoint(0, 0))
            shown = QRect(top_left, control.native.size()).intersected(scroll.viewport().rect())
            assert shown.height() > 0, f"{control.name} cannot be scrolled into view"
    assert scrolled >= 1  # two docks of controls do not both fit 768 px without scrolling
