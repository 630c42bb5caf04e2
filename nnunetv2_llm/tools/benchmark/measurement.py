"""A measurement in a fresh Python process, and the resident memory of a process (Linux /proc).

Peak memory is a per-process high-water mark, so each memory measurement runs in its own child process. Parent and
child speak one protocol: the parent runs ``python *argv REQUEST_JSON``; the child prints its result as one line
``MEASUREMENT {json}`` on stdout (``report_measurement``), which the parent parses (``run_measurement``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

MARKER = "MEASUREMENT "


class MeasurementFailed(Exception):
    """The child process exited non-zero or printed no result line; holds its exit code and output."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        super().__init__(f"measurement exited {returncode}")
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_measurement(argv: list[str], request: dict, env: dict[str, str] | None = None) -> dict:
    """Run ``python *argv json(request)`` in a fresh process (environment ``env``, default: this one's) and return
    the result it reported; MeasurementFailed when it failed or reported none."""
    proc = subprocess.run([sys.executable, *argv, json.dumps(request)], capture_output=True, text=True, env=env)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        raise MeasurementFailed(proc.returncode, proc.stdout, proc.stderr)
    return json.loads(line[len(MARKER):])


def report_measurement(result: dict) -> None:
    """The child's side of ``run_measurement``: print the result on the marked line."""
    print(MARKER + json.dumps(result), flush=True)


def current_rss() -> int:
    """Resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """RSS high-water mark in bytes (VmHWM, since the last ``reset_peak_rss``), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so that the transient
    peak of importing torch does not hide the peak of what is measured afterwards. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
