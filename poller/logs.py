"""Logging to stderr: UTC timestamps on a terminal, ``<N>`` priority prefixes and no time under journald."""

from __future__ import annotations

import logging
import os
import sys
import time

from poller.safetext import printable

# syslog priorities by logging level, for journald's stream parser (sd-daemon(3)).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def under_journald() -> bool:
    """True when stderr is the stream journald gave us ($JOURNAL_STREAM is its dev:ino)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _OneLine(logging.Formatter):
    """The message of a record is escaped to one line (a name or key cannot forge a log line);
    only a traceback, appended after it, spans lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class JournalFormatter(_OneLine):
    """Prefix every line, traceback lines included, with the record's syslog priority."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class UTCFormatter(_OneLine):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{ts}.{int(record.msecs):03d}Z"


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # boto's own debug output can carry request headers; keep it quiet whatever our level.
    for name in ("botocore", "boto3", "urllib3", "s3transfer", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # APScheduler warns once per skipped run: under overload that floods the journal. The daemon
    # counts skipped runs itself (STATUS=, metrics) and logs one summary per minute instead.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
