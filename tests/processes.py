"""Stopping a `tcgraph serve` the tests started."""
from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> bool:
    """Send `sig` (a service manager's SIGTERM, or a user's Ctrl-C: SIGINT) and wait up to `timeout` s;
    then kill it. True when it stopped by itself."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
