"""The counters and histograms of `herovm serve`, and their Prometheus text rendering (`GET /metrics`).

No client library: the text format (version 0.0.4) is a few lines of `name{labels} value`, and the server
counts a handful of things. Thread-safe: creates and refills count from worker threads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: under TCG a claim from a pool is ~0.1 s, a restore ~1 s, a cold boot ~4 s; refills under load more.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)

Labels = tuple[tuple[str, str], ...]

HELP = {
    "herovm_serve_creates_total": ("counter", "sandbox creates answered, by template, source and outcome"),
    "herovm_serve_create_seconds": (
        "histogram",
        "create latency in the server (request parsed to sandbox ready), by template and source",
    ),
    "herovm_serve_pool_claims_total": ("counter", "creates served by a pooled VM, by template"),
    "herovm_serve_pool_misses_total": ("counter", "creates of a pooled template that found the pool empty"),
    "herovm_serve_pool_refills_total": ("counter", "pool VMs made (restored, readied, paused), by template"),
    "herovm_serve_pool_refill_failures_total": ("counter", "pool refills that failed, by template"),
    "herovm_serve_pool_refill_seconds": ("histogram", "time to make one pool VM, by template"),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    pairs = (*labels, extra) if extra else labels
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, list[float]]] = {}  # bucket counts..., sum, count

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + by

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._histograms.setdefault(name, {})
            h = series.setdefault(key, [0.0] * (len(BUCKETS) + 2))
            for i, bound in enumerate(BUCKETS):
                if value <= bound:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        """A counter's value (0 if never counted), or a histogram's count: for tests and logs."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            if name in self._histograms:
                h = self._histograms[name].get(key)
                return h[-1] if h else 0.0
            return self._counters.get(name, {}).get(key, 0.0)

    def render(self, gauges: Iterable[tuple[str, str, list[tuple[Labels, float]]]] = ()) -> str:
        """The text exposition: `gauges` (name, help, [(labels, value)]) measured now, then the counters and
        histograms. Every known family is shown, with no series until it is counted."""
        out: list[str] = []
        for name, help_text, series in gauges:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            out += [f"{name}{_labels(labels)} {_num(v)}" for labels, v in series]
        with self._lock:
            for name, (kind, help_text) in HELP.items():
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for labels, v in sorted(self._counters.get(name, {}).items()):
                        out.append(f"{name}{_labels(labels)} {_num(v)}")
                    continue
                for labels, h in sorted(self._histograms.get(name, {}).items()):
                    for bound, n in zip((*BUCKETS, math.inf), (*h[: len(BUCKETS)], h[-1]), strict=True):
                        out.append(f"{name}_bucket{_labels(labels, ('le', _num(bound)))} {_num(n)}")
                    out.append(f"{name}_sum{_labels(labels)} {_num(h[-2])}")
                    out.append(f"{name}_count{_labels(labels)} {_num(h[-1])}")
        return "\n".join(out) + "\n"
