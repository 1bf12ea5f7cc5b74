"""Long work off the GUI thread: a progress bar + Cancel button that runs one job at a time.

A job is `fn(report, cancel)`, run in napari's `thread_worker`: `report(done, total, info=None,
stage=None)` moves the bar ("tile 24 / 441, about 1 min left"; `stage` names a step without a count,
e.g. "post-processing") and hands `info` to the widget (e.g. a loss value); `cancel` is a
threading.Event set by the Cancel button, which the engine functions check between steps. The job's
exceptions are caught in the worker and shown as a short message on the GUI thread. Results reach
`on_result` on the GUI thread, unless the widget was deleted meanwhile (the viewer closed).

With a shared `ModelState`, the panel counts itself in `state.jobs`, so every widget can disable
what must not run at the same time (loading a model, moving it to another device).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from napari.qt.threading import thread_worker
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QHBoxLayout, QProgressBar, QPushButton, QWidget

from ._common import UserError, alive, show_error, show_info, worker_threads
from src_models.inference import Cancelled

log = logging.getLogger(__name__)


def time_left(elapsed: float, done: int, total: int) -> str:
    """'about 40 s left' from the rate so far ('' until there is a rate to go by)."""
    if done <= 0 or total <= done or elapsed < 1.0:
        return ""
    left = elapsed / done * (total - done)
    if left < 60:
        return f", about {max(1, int(round(left)))} s left"
    return f", about {int(round(left / 60))} min left"


class JobPanel(QWidget):
    progressed = Signal(int, int)
    staged = Signal(str)
    info = Signal(object)
    started = Signal()
    finished = Signal()  # after the result (or error) has been handled, on the GUI thread

    def __init__(self, parent=None, state=None, unit: str = "step"):
        super().__init__(parent)
        self.state = state
        self.unit = unit
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.setFormat("")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar, 1)
        layout.addWidget(self.cancel_button)
        self.cancel_button.clicked.connect(self.cancel)
        self.progressed.connect(self._on_progress)
        self.staged.connect(self._on_stage)
        self._stage = ""  # the step without a count shown now, with its seconds so far
        self._stage_t0 = 0.0
        self._stage_timer = QTimer(self)
        self._stage_timer.setInterval(1000)
        self._stage_timer.timeout.connect(self._tick_stage)
        self.worker = None
        self._cancel = threading.Event()
        self._last_emit = 0.0
        self._t0 = 0.0
        self._what = ""
        self.destroyed.connect(self._cancel.set)  # the viewer closed: stop the job early

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def cancel(self) -> None:
        self._cancel.set()
        self._stage_timer.stop()
        self._set_bar(text="cancelling…")
        self.cancel_button.setEnabled(False)  # pressing it again does nothing more

    def _set_bar(self, value: int | None = None, maximum: int | None = None,
                 text: str | None = None) -> None:
        """Changes the bar with one later repaint. QProgressBar.setValue repaints at once, and in
        napari's window (composited with OpenGL because of the canvas) every repaint composes
        the whole window, ~10-60 ms of the GUI thread; with updates off, Qt paints once, in its
        next pass, for all the changes."""
        bar = self.bar
        bar.setUpdatesEnabled(False)
        try:
            if maximum is not None:
                bar.setMaximum(maximum)
            if value is not None:
                bar.setValue(value)
            if text is not None:
                bar.setFormat(text)
        finally:
            bar.setUpdatesEnabled(True)
            bar.update()

    def _on_progress(self, done: int, total: int) -> None:
        if self._cancel.is_set():
            return
        self._stage_timer.stop()
        unit = getattr(self, "_job_unit", self.unit)
        self._set_bar(done, max(total, 1),
                      f"{unit} {done} / {total}{time_left(time.monotonic() - self._t0, done, total)}")

    def _on_stage(self, text: str) -> None:
        """A step without a count: its name on an empty bar, with its seconds so far once a
        second (napari's busy animation would repaint the window ~16 times a second)."""
        if self._cancel.is_set():
            return
        self._stage, self._stage_t0 = text, time.monotonic()
        self._set_bar(0, 1, text)
        self._stage_timer.start()

    def _tick_stage(self) -> None:
        if not alive(self) or self.worker is None or self._cancel.is_set():
            self._stage_timer.stop()
            return
        self._set_bar(text=f"{self._stage} {time.monotonic() - self._stage_t0:.0f} s")

    def run(self, fn: Callable[[Callable, threading.Event], Any], on_result: Callable[[Any], None],
            what: str, hint: str = "", unit: str | None = None,
            on_cancelled: Callable[[], str] | None = None) -> bool:
        """Starts `fn` in a worker unless one is running; False (and a message) if busy.
        `unit` names what this job's counts count (the panel's own unit otherwise);
        `on_cancelled()` runs on the GUI thread when the job stopped at Cancel and returns the
        one-line message shown then (default: "<what> cancelled.")."""
        if self.worker is not None:
            show_info("napari-dca is still busy; wait for it or press Cancel.")
            return False
        self._job_unit = unit or self.unit
        self._cancel.clear()
        cancel = self._cancel
        self._t0 = time.monotonic()
        self._what = what

        def report(done: int, total: int, info: Any = None, stage: str | None = None) -> None:
            now = time.monotonic()
            if stage is not None:
                self.staged.emit(stage)
            # Throttle bar updates (each repaints the window; 4 a second read as smooth); always
            # pass info.
            elif done >= total or now - self._last_emit > 0.25:
                self._last_emit = now
                self.progressed.emit(done, total)
            if info is not None:
                self.info.emit(info)
            time.sleep(0)  # let the GUI thread take the GIL between steps

        @thread_worker
        def work():
            try:
                with worker_threads():
                    return ("ok", fn(report, cancel))
            except Cancelled:
                return ("cancelled", None)
            except Exception as err:  # shown as a message on the GUI thread, never a traceback
                log.debug("napari-dca job %s failed", what, exc_info=True)
                return ("error", err)

        outcome = {}

        def returned(result):
            status, value = result
            outcome["status"] = "done" if status == "ok" else status
            if not alive(self):
                return  # the viewer (and this widget) went away while the job ran
            try:
                if status == "ok":
                    on_result(value)
                elif status == "cancelled":
                    show_info(on_cancelled() if on_cancelled is not None
                              else f"napari-dca: {what} cancelled.")
                else:
                    msg = str(value) if isinstance(value, UserError) else (
                        f"{what} failed: {value}. {hint}".strip())
                    show_error(msg)
            except UserError as err:
                show_error(str(err))
            except RuntimeError as err:
                if alive(self):
                    log.debug("napari-dca: handling %s failed", what, exc_info=True)
                    show_error(f"{what}: could not show the result ({err}).")
            except Exception as err:
                log.debug("napari-dca: handling %s failed", what, exc_info=True)
                show_error(f"{what}: could not show the result ({err}).")

        def done():
            self.worker = None
            if self.state is not None:
                self.state.jobs = max(0, self.state.jobs - 1)
            if not alive(self):
                return
            self._stage_timer.stop()
            self.cancel_button.setEnabled(False)
            status = "cancelled" if cancel.is_set() else outcome.get("status", "done")
            top = max(self.bar.maximum(), 1)
            seconds = time.monotonic() - self._t0
            self._set_bar(top if status == "done" else min(self.bar.value(), top), top,
                          {"done": f"{what}: done in {seconds:.0f} s" if seconds >= 1 else f"{what}: done",
                           "cancelled": f"{what}: cancelled"}.get(status, f"{what}: failed"))
            self.finished.emit()

        self._on_stage(f"{what}…")  # until the first report
        self.cancel_button.setEnabled(True)
        self.worker = work()
        self.worker.returned.connect(returned)
        self.worker.finished.connect(done)
        if self.state is not None:
            self.state.jobs += 1
        self.started.emit()
        self.worker.start()
        return True
