"""Memory and time of one call, per process (bench/reshard_bench.py): the resident set from
/proc/self/status, its high-water mark reset on entry (``/proc/self/clear_refs``), and a
sampler for the split of the peak into anonymous and file-backed pages."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no {key}")


class RssSampler:
    """The highest anonymous and file-backed resident sizes while it runs (a thread reading
    /proc/self/status every ~2 ms): the split of the peak that VmHWM gives as one number."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon = max(self.anon, status_kb("RssAnon") * 1024)
            self.file = max(self.file, status_kb("RssFile") * 1024)
            self._stop.wait(0.002)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measured(fn: Callable[..., Any], record: dict[str, Any]) -> Callable[..., Any]:
    """``fn`` wrapped: each call adds its seconds to ``record`` and records (bytes) the RSS on
    entry (``baseline_rss``, of the first call), on exit (``end_rss``), the peak during it
    (``peak_rss``: VmHWM, reset on entry) and the sampled peaks of its anonymous and
    file-backed parts."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        record.setdefault("baseline_rss", status_kb("VmRSS") * 1024)
        record.setdefault("baseline_anon", status_kb("RssAnon") * 1024)
        t0 = time.perf_counter()
        try:
            with RssSampler() as sampler:
                return fn(*args, **kwargs)
        finally:
            record["seconds"] = record.get("seconds", 0.0) + time.perf_counter() - t0
            record["peak_rss"] = max(record.get("peak_rss", 0), status_kb("VmHWM") * 1024)
            record["end_rss"] = status_kb("VmRSS") * 1024
            record["end_anon"] = status_kb("RssAnon") * 1024
            record["peak_anon"] = max(record.get("peak_anon", 0), sampler.anon)
            record["peak_file"] = max(record.get("peak_file", 0), sampler.file)
            record["calls"] = record.get("calls", 0) + 1
    return wrapper


def timed_only(fn: Callable[..., Any], record: dict[str, Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record["seconds"] = record.get("seconds", 0.0) + time.perf_counter() - t0
    return wrapper
