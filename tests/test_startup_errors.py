"""Start-up problems a newcomer hits end in one clean `signing-proxy: ...` line, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signing_proxy.cli import main

from .proc import free_port, write_config


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signing_proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in-process (no interpreter start-up), for failures before logging is set up."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed start (JSON log lines before it are allowed)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("signing-proxy: ")
    return lines[0]


def _config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "upstreams": {"api.coinbase.com": {}},
    }
    raw.update(extra)
    return raw


@pytest.mark.parametrize("workers", ["1", "2"])
def test_busy_port_is_one_line(tmp_path: Path, workers: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        raw = _config(tmp_path, listen=f"127.0.0.1:{port}")
        result = _run(
            "serve", "-c", str(write_config(tmp_path / "c.yaml", raw)), "--workers", workers
        )
    assert result.returncode == 2
    line = _one_line(result)
    assert f"listen: cannot listen on 127.0.0.1:{port} (Address already in use;" in line
    assert "is another signing-proxy running?" in line


def test_config_path_that_is_not_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_line(result := _main(capsys, "check", "-c", str(tmp_path)))
    assert result.returncode == 2 and "cannot read config file (Is a directory)" in line
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    line = _one_line(result := _main(capsys, "serve", "-c", str(binary)))
    assert result.returncode == 2 and "not UTF-8 text" in line


def test_directory_as_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys").mkdir()
    line = _one_line(
        result := _main(
            capsys, "jwt", "--key-file", str(tmp_path / "keys"), "GET", "api.coinbase.com/x"
        )
    )
    assert result.returncode == 1 and "cannot read (Is a directory)" in line
    raw = _config(tmp_path, credentials={"t": {"key_file": str(tmp_path / "keys")}})
    raw["upstreams"]["api.coinbase.com"] = {"credential": "t"}
    result = _main(capsys, "check", "-c", str(write_config(tmp_path / "c.yaml", raw)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "key_file" in result.stderr and "Is a directory" in result.stderr


@pytest.mark.parametrize(
    ("ca_file", "reason"),
    [("dir", "Is a directory"), ("missing.pem", "No such file"), ("bad.pem", "no PEM certificate")],
)
def test_unusable_ca_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ca_file: str, reason: str
) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    raw = _config(tmp_path, upstreams={"api.coinbase.com": {"ca_file": str(tmp_path / ca_file)}})
    config = str(write_config(tmp_path / "c.yaml", raw))
    result = _main(capsys, "check", "-c", config)
    assert result.returncode == 1 and reason in result.stderr and "Traceback" not in result.stderr
    if ca_file == "dir":  # serve as users run it, a process (the same check for all three)
        line = _one_line(result := _run("serve", "-c", config))
        assert result.returncode == 2 and "upstreams.api.coinbase.com.ca_file: cannot use" in line
        assert reason in line


@pytest.mark.parametrize("value", ["0", "-1", "65", "many"])
def test_bad_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    config = str(write_config(tmp_path / "c.yaml", _config(tmp_path)))
    result = _main(capsys, "serve", "-c", config, "--workers", value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--workers" in result.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("url", "https://127.0.0.1:99999"),
        ("url", "https://127.0.0.1:0"),
        ("url", "https://127.0.0.1:x"),
        ("url", "wss://[::1]:70000"),
        ("listen", "127.0.0.1:65536"),
        ("admin_listen", "127.0.0.1:-1"),
        ("tls_server_name", "https://api.coinbase.com"),
    ],
)
def test_ports_outside_range_fail_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: str
) -> None:
    raw = _config(tmp_path)
    if field in ("url", "tls_server_name"):
        raw["upstreams"]["api.coinbase.com"] = {field: value}
    else:
        raw[field] = value
    line = _one_line(
        result := _main(capsys, "check", "-c", str(write_config(tmp_path / "c.yaml", raw)))
    )
    assert result.returncode == 2 and field in line
