"""Process helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Stop a process started with `start_new_session=True` and everything it spawned (a gateway and its Ray):
    SIGINT for a clean shutdown, then SIGKILL for whatever is left of the group."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
