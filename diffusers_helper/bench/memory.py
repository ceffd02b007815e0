"""The benchmarks' one memory sampler: this process's peak private memory and peak RSS.

- Private memory: on Linux the Anonymous pages of /proc/self/smaps_rollup, which leave out the
  memory-mapped weights (file pages the kernel can drop and read again); elsewhere psutil's USS,
  an upper bound. Sampled by a thread.
- RSS, overall and per window (bench-long's windows are its sections): on Linux the kernel's own
  high-water mark (VmHWM, the figure behind ru_maxrss) is read and reset at each window's end
  (/proc/self/clear_refs), so every window's peak is exact. Elsewhere the thread's samples stand in.
  The overall peak is the largest of the windows' marks, the samples and ru_maxrss.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import Optional

_SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")
_ANONYMOUS = re.compile(r"^Anonymous:\s+(\d+) kB", re.M)


class MemorySampler:
    """Peak private memory and peak RSS of this process, sampled every `interval` seconds.

    `private`: also sample the private memory (reading smaps_rollup costs more than the RSS).
    `windows`: measure peak RSS per window (`take_window`); on Linux the kernel's mark is reset
    when sampling starts, so the first window starts then.
    """

    def __init__(self, interval: float = 0.05, *, private: bool = True, windows: bool = False):
        self.interval = interval
        self.private = private
        self.peak_private = 0  # bytes
        self.sampled_peak_rss = 0  # bytes
        self.exact = False  # whether the per-window peaks are the kernel's (else sampled)
        self._windows = windows
        self._window_sampled = 0
        self._max_hwm_kib = 0  # the largest window peak read from VmHWM
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            import psutil

            self._process = psutil.Process()
        except ImportError:  # psutil is in requirements.txt, but the kernel's figures suffice
            self._process = None

    # -- starting and stopping ------------------------------------------------------------------

    def start(self) -> "MemorySampler":
        """Take a first sample and start the sampling thread."""
        if self._windows:
            self.exact = _hwm_kib() is not None and self._reset_hwm()
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "MemorySampler":
        """Stop the thread and take a last sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        return self

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    # -- samples ------------------------------------------------------------------------------------

    def sample(self) -> Optional[int]:
        """Read the memory now and raise the peaks; returns the RSS now (None without psutil)."""
        if self.private:
            self.peak_private = max(self.peak_private, self.private_now())
        rss = self.rss_now()
        self.sampled_peak_rss = max(self.sampled_peak_rss, rss or 0)
        self._window_sampled = max(self._window_sampled, rss or 0)
        return rss

    @staticmethod
    def private_now() -> int:
        """Private (anonymous) bytes now."""
        if _SMAPS_ROLLUP.exists():
            match = _ANONYMOUS.search(_SMAPS_ROLLUP.read_text())
            if match:
                return int(match.group(1)) * 1024
        import psutil

        return int(psutil.Process().memory_full_info().uss)

    def rss_now(self) -> Optional[int]:
        """The RSS now, in bytes (None without psutil)."""
        return None if self._process is None else int(self._process.memory_info().rss)

    # -- windows and the overall peak ----------------------------------------------------------

    def take_window(self) -> tuple[Optional[int], Optional[int]]:
        """(RSS now, peak RSS since the previous call or the start) in bytes; starts a new window."""
        rss = self.sample()
        if self.exact:
            peak_kib = _hwm_kib()
            self.exact = peak_kib is not None and self._reset_hwm()
            if peak_kib is not None:
                self._window_sampled = 0
                return rss, peak_kib * 1024
        peak, self._window_sampled = (self._window_sampled or None), (rss or 0)
        return rss, peak

    def peak_rss_kib(self) -> int:
        """The whole process's peak RSS in KiB, over every window so far."""
        candidates = [self._max_hwm_kib, self.sampled_peak_rss // 1024, _hwm_kib() or 0]
        try:
            import resource
        except ImportError:  # Windows: the working set's high-water mark
            if self._process is not None:
                candidates.append(getattr(self._process.memory_info(), "peak_wset", 0) // 1024)
        else:
            # KiB on Linux, bytes on macOS; after a VmHWM reset it covers only the current window.
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            candidates.append(maxrss // 1024 if sys.platform == "darwin" else maxrss)
        return int(max(candidates))

    def _reset_hwm(self) -> bool:
        before = _hwm_kib() or 0
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")  # 5: reset the peak RSS to the current RSS
        except OSError:
            return False
        self._max_hwm_kib = max(self._max_hwm_kib, before)
        return True


def _hwm_kib() -> Optional[int]:
    """The kernel's peak-RSS mark of this process (VmHWM) in KiB, where there is one."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])  # always in kB
    except (OSError, ValueError, IndexError):
        return None
    return None
