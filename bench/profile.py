"""py-spy around a running daemon (``--profile`` of the benchmarks): raw folded stacks, and a summary
of where the busy samples went, so a missed figure comes with the evidence of what limits it."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


class Spy:
    """py-spy recording a daemon until ``stop()``: raw folded stacks, 100 samples/s."""

    def __init__(self, pid: int, out: Path, *, gil: bool = False, nonblocking: bool = False) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        # --gil: only the thread holding the GIL is sampled, so the shares are of the interpreter's time.
        # --nonblocking: the daemon is not paused per sample (a pause per sample of ~100 threads took
        # more CPU than the daemon itself: a profile of a measured pass must not be one).
        flags = [*(["--gil"] if gil else []), *(["--nonblocking"] if nonblocking else [])]
        self.proc = subprocess.Popen(
            [spy, "record", "-r", "100", "-f", "raw", "-o", str(out), "--pid", str(pid), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# A leaf frame on one of these calls is a thread waiting (py-spy cannot tell idle threads here): a
# queue, a lock, a condition, a socket read (the server's time), a selector.
_WAITING = re.compile(r"\.(get|wait|acquire|join|select|poll|recv|recv_into|readinto|accept|sleep)\(")


def _source_line(file: str, line: int, cache: dict[tuple[str, int], str]) -> str:
    """The text of ``file``:``line`` as py-spy names it (relative to a sys.path entry), or ""."""
    if (file, line) not in cache:
        text = ""
        for base in sys.path:
            candidate = Path(base or ".") / file
            if candidate.is_file():
                lines = candidate.read_text(errors="replace").splitlines()
                text = lines[line - 1] if 0 < line <= len(lines) else ""
                break
        cache[(file, line)] = text
    return cache[(file, line)]


def profile_summary(path: Path, top: int = 12) -> dict[str, Any]:
    """The functions with most of py-spy's busy samples (raw output), inclusive and self, in % of the
    busy samples (not waiting on a queue, lock or socket); lines of one function count together."""
    total, busy, inclusive, own = 0, 0, Counter[str](), Counter[str]()
    cache: dict[tuple[str, int], str] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        matches = [m for m in map(_FRAME.match, stack.split(";")) if m is not None]
        if not matches:
            continue
        leaf = matches[-1]
        if leaf["line"] and _WAITING.search(_source_line(leaf["file"], int(leaf["line"]), cache)):
            continue
        busy += count
        frames = [f"{m['func']} ({m['file'].rsplit('site-packages/', 1)[-1]})" for m in matches]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        # A thread's entry frames hold every sample of it: they say nothing.
        return [(f, round(100 * n / busy, 1)) for f, n in c.most_common() if n < 0.97 * busy][:top]

    return {"samples": total, "busy": busy, "inclusive": share(inclusive), "self": share(own)}


def print_summary(label: str, spied: dict[str, Any]) -> None:
    """The summary of ``profile_summary`` in two lines: inclusive and self shares of the busy samples."""
    print(f"  py-spy, {label}: {spied['busy']} busy of {spied['samples']} samples; % of busy, inclusive:")
    print("    " + "; ".join(f"{f} {pct}" for f, pct in spied["inclusive"]))
    print("    % self: " + "; ".join(f"{f} {pct}" for f, pct in spied["self"]))
