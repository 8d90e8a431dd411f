"""The shipped systemd unit: `systemd-analyze verify` must print nothing (its exit code is 0 even on bad keys)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "contrib" / "systemd" / "poller.service"


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("POLLER_REQUIRE_SYSTEMD_ANALYZE"):
            pytest.fail("systemd-analyze is required here (POLLER_REQUIRE_SYSTEMD_ANALYZE is set) but missing")
        pytest.skip("systemd-analyze not installed")
    return tool


def test_unit_verifies_cleanly(tmp_path: Path):
    tool = analyze()
    poller_bin = Path(sys.executable).with_name("poller")
    text = UNIT.read_text().replace("/usr/local/bin/poller", str(poller_bin))
    unit = tmp_path / "poller.service"
    unit.write_text(text)
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_unit_contract():
    lines = [line for line in UNIT.read_text().splitlines() if not line.startswith("#")]
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=poller",
        "ConfigurationDirectory=poller",
        "StateDirectoryMode=0750",
        "ProtectSystem=strict",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "User=poller",
    ):
        assert any(have.startswith(line) for have in lines), line
    assert not any(have.startswith("DynamicUser") for have in lines)
