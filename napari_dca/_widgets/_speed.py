"""How fast a model is, in the words the Model widget shows: "nuclei_accurate (accurate, 1.9 s per
1000×1000 on this CPU)", from the card's measured `metrics["speed_1000"]` (written by
benchmarks/time_1000.py when the model is shipped: the median whole Segment of a 1000×1000 image,
probabilities + objects). A card without that measurement shows no time; nothing is estimated.

The bundled models come in two variants, told apart by name: `X` (fast) and `X_accurate`."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

ACCURATE_SUFFIX = "_accurate"


def variant(name: str) -> str:
    """'accurate' for a name ending in _accurate, else 'fast' (the bundled models' naming)."""
    return "accurate" if Path(str(name)).stem.endswith(ACCURATE_SUFFIX) else "fast"


@lru_cache(maxsize=1)
def this_cpu() -> str:
    """The CPU's model name as benchmarks/time_1000.py records it (lscpu's 'Model name' is
    /proc/cpuinfo's 'model name'), read without starting a process."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def speed_of(card) -> dict | None:
    """The card's measured 1000×1000 timing, or None when it has none (or an unreadable one)."""
    metrics = getattr(card, "metrics", None) or {}
    speed = metrics.get("speed_1000") if isinstance(metrics, dict) else None
    if not isinstance(speed, dict):
        return None
    try:
        if float(speed["seconds"]) > 0:
            return speed
    except (KeyError, TypeError, ValueError):
        pass
    return None


def _seconds(value) -> str:
    value = float(value)
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def where_measured(speed: dict) -> str:
    cpu = str(speed.get("cpu", "")).strip()
    if not cpu or cpu == this_cpu():
        return "on this CPU" if cpu else "on the CPU it was measured on"
    return f"on {cpu}"


def short_speed(speed: dict | None) -> str:
    """'0.7 s per 1000×1000 on this CPU' ('' without a measurement)."""
    if speed is None:
        return ""
    return f"{_seconds(speed['seconds'])} per 1000×1000 {where_measured(speed)}"


def picker_label(name: str, card, bundled: bool = True) -> str:
    """The checkpoint picker's text: 'nuclei (fast, 0.7 s per 1000×1000 on this CPU)'; a bundled
    model without a measured time keeps 'nuclei (bundled)'; a file shows its name (+ the time)."""
    speed = short_speed(speed_of(card))
    if bundled:
        return f"{name} ({variant(name)}, {speed})" if speed else f"{name} (bundled)"
    return f"{name} ({speed})" if speed else name


def speed_details(speed: dict) -> str:
    """One line for the card view and the picker's tooltip: the split and how it was measured."""
    parts = [f"{_seconds(speed['seconds'])} per 1000×1000 image {where_measured(speed)}"]
    split = []
    for key, what in (("probabilities_s", "model"), ("instances_s", "objects")):
        try:
            split.append(f"{_seconds(speed[key])} {what}")
        except (KeyError, TypeError, ValueError):
            pass
    if split:
        parts.append(" + ".join(split))
    how = []
    if speed.get("threads"):
        n = int(speed["threads"])
        how.append(f"{n} thread{'s' if n != 1 else ''}")
    if speed.get("runtime"):
        how.append(f"{speed['runtime']} runtime")
    if how:
        parts.append(", ".join(how))
    text = "; ".join(parts) + " (median whole Segment: probabilities + objects)"
    if speed.get("command"):
        text += f"; measured with: {speed['command']}"
    return text
