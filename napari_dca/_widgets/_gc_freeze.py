"""Short garbage collections while napari-dca's widgets are open.

With torch, napari and Qt loaded, Python tracks ~400 000 objects, and each automatic full garbage
collection scans them all: ~0.3-0.6 s in which the whole process, the GUI thread included, stands
still (tests/gui/test_correction_session.py saw four in one session, one of them started by a
worker). Nearly all of those objects live as long as the process (modules, classes, napari's
and torch's internals), so when the first widget opens they are moved out of the collector's
scans (`gc.freeze`); objects made later are collected as usual, and objects of any age that no
longer have references are still freed at once by reference counting.

An object frozen now that ends up in an unreachable reference cycle later is not collected while
frozen. The one such case that holds real memory is a layer that existed before the widget opened
and is removed later, so the first removal of a layer, and the closing of the widget, put every
object back under the collector (`gc.unfreeze`) for the rest of the process: napari collects at
once when it removes a layer.
"""
from __future__ import annotations

import gc

_STATE = {"frozen": False, "done": False}  # once per process: frozen now / frozen once already


def freeze_long_lived(viewer, widget) -> None:
    """Moves the objects alive now into the permanent generation, once per process, unless
    someone else (napari, the user) froze objects already."""
    if _STATE["done"] or gc.get_freeze_count():
        return
    _STATE.update(frozen=True, done=True)
    gc.freeze()
    viewer.layers.events.removing.connect(thaw)
    widget.destroyed.connect(thaw)


def thaw(*_) -> None:
    """Every frozen object back under the collector (for the rest of the process)."""
    if _STATE["frozen"]:
        _STATE["frozen"] = False
        gc.unfreeze()
