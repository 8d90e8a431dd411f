"""sd_notify(3) over ``$NOTIFY_SOCKET`` in a few lines, without libsystemd."""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends state lines to systemd; a no-op when not started by systemd (no NOTIFY_SOCKET)."""

    def __init__(self, address: str | None = None, timeout: float = 0.5) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        self._address = ""
        if address:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A datagram to a peer that stopped reading blocks once its queue is full (10 messages
            # by default): without a timeout the main loop would hang there, deaf to SIGTERM.
            self._sock.settimeout(timeout)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; return False if systemd could not be told."""
        if self._sock is None:
            return False
        try:
            # One assignment per line: a line break inside a value (a multi-line database error in
            # STATUS=) would be read as more assignments.
            text = "\n".join(line.replace("\n", " ") for line in lines)
            self._sock.sendto(text.encode("utf-8", "replace"), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2
