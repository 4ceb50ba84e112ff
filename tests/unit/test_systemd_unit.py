"""blockd/systemd: the unit file is valid for systemd and carries the settings the service
relies on; the example config names every key of blockd.config.Config and loads."""

from __future__ import annotations

import configparser
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockd import config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "blockd" / "systemd" / "blockd@.service"
EXAMPLE = ROOT / "blockd" / "systemd" / "blockd.toml.example"
VENV_BLOCKD = Path(sys.executable).parent / "blockd"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's syntax: sections, repeatable keys (kept in order), `#` comments."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                          empty_lines_in_values=False, dict_type=dict)
    parser.optionxform = str  # keys are case-sensitive
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.splitlines():  # configparser merges repeated keys; keep each one
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            section = out.setdefault(m.group(1), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"not a unit line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    parser.read_string(text)  # and configparser must agree on the sections
    assert set(parser.sections()) == set(out)
    return out


def one(unit, section, key) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing from {UNIT.name}"
    return values[-1]


def test_unit_has_the_settings_blockd_relies_on():
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert one(unit, "Service", "Type") == "notify"  # blockd sends READY=1 (service.sd_notify)
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "ExecStart") == "/usr/local/bin/blockd --config /etc/vbp/blockd-%i.toml"
    assert one(unit, "Service", "WatchdogSec") == "30"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert int(one(unit, "Service", "TimeoutStopSec")) >= 15
    assert int(one(unit, "Service", "LimitNOFILE")) >= 4096
    # a bad config (exit 2) is not retried forever
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split()
    hardening = {
        "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/vbp", "ProtectHome": "yes",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
    }
    for key, value in hardening.items():
        assert one(unit, "Service", key) == value, key
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "multi-user.target" in one(unit, "Install", "WantedBy")
    # the watchdog must be well above the period blockd pings it at (service._watchdog: 5 s)
    assert int(one(unit, "Service", "WatchdogSec")) >= 3 * 5
    assert "User" in svc and "StateDirectory" in svc


def test_systemd_analyze_verify(tmp_path):
    """Verify with systemd's own checker where it is installed (it needs ExecStart to exist,
    so a copy points at this venv's blockd). Where it is not, the parse test above is the check."""
    analyze = shutil.which("systemd-analyze")
    text = UNIT.read_text()
    assert text.count("\nExecStart=") == 1
    if analyze is None:
        parse_unit(text)
        return
    assert VENV_BLOCKD.exists(), f"{VENV_BLOCKD} missing: install the project into the venv"
    unit = tmp_path / "blockd@.service"
    unit.write_text(re.sub(r"(?m)^ExecStart=/usr/local/bin/blockd", f"ExecStart={VENV_BLOCKD}", text))
    p = subprocess.run([analyze, "verify", str(tmp_path / "blockd@h1.service")],
                       capture_output=True, text=True, timeout=60)
    ours = [line for line in (p.stdout + p.stderr).splitlines() if "blockd@" in line or str(tmp_path) in line]
    assert p.returncode == 0 and not ours, (
        f"systemd-analyze verify rejects {UNIT.name} (rc {p.returncode}):\n" + "\n".join(ours or [p.stderr]))


def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    """The check above would see a mistake: a bad value and an unknown key are reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        with pytest.raises(AssertionError):
            parse_unit("[Service]\nnot a unit line\n")
        return
    unit = tmp_path / "blockd@.service"
    text = re.sub(r"(?m)^ExecStart=/usr/local/bin/blockd", f"ExecStart={VENV_BLOCKD}", UNIT.read_text())
    unit.write_text(text.replace("Type=notify", "Type=notifyy").replace("[Install]", "[Install]\nBogus=1"))
    p = subprocess.run([analyze, "verify", str(tmp_path / "blockd@h1.service")],
                       capture_output=True, text=True, timeout=60)
    assert "notifyy" in p.stderr and "Bogus" in p.stderr


def test_example_config_names_every_key_and_loads():
    keys = {re.match(r"([\w-]+)\s*=", line).group(1).replace("-", "_")
            for line in EXAMPLE.read_text().splitlines() if re.match(r"[\w-]+\s*=", line)}
    fields = {f.name for f in dataclasses.fields(config.Config)}
    assert keys == fields, f"missing: {sorted(fields - keys)}, unknown: {sorted(keys - fields)}"
    cfg = config.load(str(EXAMPLE), {})
    assert cfg.host_id == "h1" and cfg.registry.startswith("etcd://")
    assert cfg.capacity == 100 * 1024**3
    assert cfg.data_dir.startswith("/var/lib/vbp/")  # the unit's only writable path


def test_example_config_path_matches_the_unit():
    unit = parse_unit(UNIT.read_text())
    assert "/etc/vbp/blockd-%i.toml" in one(unit, "Service", "ExecStart")
    assert "/etc/vbp/blockd-" in EXAMPLE.read_text()
