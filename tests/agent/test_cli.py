"""`pilotfish agent` refusing bad start-up input as a real process: one error line naming the
setting, exit status 2, no traceback, nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import billion_laughs
from procs import PILOTFISH, Process

DEEP_JSON = "[" * 5000 + "]" * 5000
DEEP_YAML = "a:\n  " + "- " * 5000 + "x\n"  # block sequences, one level per "- "


def run_agent(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The agent with `env` over a clean environment (no DNS proxy, no status port), which must
    exit by itself: every case here is refused before anything starts."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PILOT", "PROXY_CONFIG", "XDS_"))}
    return subprocess.run([PILOTFISH, "agent", "--status-port", "0", *args], check=False, cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def assert_refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2 with one ERROR line that carries every one of `words`, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("text", [DEEP_JSON, "a: " + DEEP_JSON, DEEP_YAML], ids=["json", "yaml-flow", "yaml-block"])
def test_deeply_nested_proxy_config_is_a_clear_error(tmp_path: Path, text: str) -> None:
    assert_refused(run_agent(tmp_path, {"PROXY_CONFIG": text}), "PROXY_CONFIG", "nested too deeply")


@pytest.mark.parametrize("text,words", [
    ("a: 2001-13-45", ("not YAML or JSON", "month must be in 1..12")),
    ('x: !!int ""', ("not YAML or JSON", "IndexError")),
    ("x: !!float abc", ("not YAML or JSON", "ValueError")),
    ("statusPort: 0x" + "f" * 5000, ("statusPort: want a string or a number",)),
    (billion_laughs(), ("proxyMetadata: want a string or a number, got list",)),  # str() of it never ends
], ids=["date", "empty-int", "float", "huge-int", "billion-laughs"])
def test_proxy_config_that_does_not_parse_is_a_clear_error(tmp_path: Path, text: str, words: tuple[str, ...]) -> None:
    """Any failure to parse PROXY_CONFIG, not only PyYAML's own error class, is the one-line
    error naming it and exit 2 (the root is SYSTEM so that the check of PROXY_CONFIG is what
    decides)."""
    assert_refused(run_agent(tmp_path, {"PROXY_CONFIG": text, "XDS_ROOT_CA": "SYSTEM"}), "PROXY_CONFIG", *words)


def test_an_undecodable_header_value_is_a_clear_error(tmp_path: Path) -> None:
    """XDS_HEADER_FOO holding bytes that are not UTF-8 (os.environ keeps them as surrogates): a
    UnicodeEncodeError in the stream's thread ended the agent with a traceback."""
    proc = subprocess.run([PILOTFISH, "agent", "--status-port", "0"], check=False, cwd=tmp_path, capture_output=True,
                          env={"PATH": os.environ["PATH"], "XDS_HEADER_FOO": b"\xff".decode("utf-8", "surrogateescape"),
                               "XDS_ROOT_CA": "SYSTEM"}, text=True, timeout=30)
    assert_refused(proc, "XDS_HEADER_FOO: not a valid gRPC header value")


PEM_JUNK = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("kind,why", [
    ("directory", "is a directory"),
    ("empty", "is empty"),
    ("text", "holds no PEM certificate"),
    ("junk-pem", "holds no PEM certificate"),
    ("empty-sequence", "holds no PEM certificate"),
])
def test_unusable_root_ca_is_refused_at_start(tmp_path: Path, kind: str, why: str) -> None:
    """docs/agent.md: a missing root is a start-up error; so is one that cannot be used, rather
    than a control plane retried forever with a TLS error."""
    root = tmp_path / "root-cert.pem"
    if kind == "directory":
        root.mkdir()
    else:
        root.write_text({"empty": "", "text": "not a certificate\n", "junk-pem": PEM_JUNK,
                         "empty-sequence": PEM_JUNK.replace("bm90IGEgY2VydGlmaWNhdGU=", "MAA=")}[kind])
    line = assert_refused(run_agent(tmp_path, {"XDS_ROOT_CA": str(root)}), "XDS_ROOT_CA", str(root), why)
    assert "agent: node" not in line


def test_unusable_default_root_is_refused_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "var/run/secrets/istio/root-cert.pem").mkdir(parents=True)
    assert_refused(run_agent(tmp_path, {}), "XDS_ROOT_CA", "./var/run/secrets/istio/root-cert.pem", "is a directory")


def test_a_missing_ca_root_is_refused_naming_it(tmp_path: Path) -> None:
    """As Istio's FindRootCAForCA: the CA connection's root must exist (here the xDS one is the
    OS store, so only the CA's is missing)."""
    assert_refused(run_agent(tmp_path, {"XDS_ROOT_CA": "SYSTEM"}), "CA_ROOT_CA (unset: the default)",
                   "root CA file for the CA does not exist: ./var/run/secrets/istio/root-cert.pem")


def test_unusable_token_is_a_warning_and_the_agent_starts(tmp_path: Path) -> None:
    """Istio leaves the bearer header out when the token file cannot be read (mTLS alone may
    authenticate, and kubelet writes the token after start), so this is no start-up error; but a
    directory there will never become a token, and that is said once, at start."""
    (tmp_path / "var/run/secrets/tokens/istio-token").mkdir(parents=True)
    env = {**os.environ, "PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}', "CA_ROOT_CA": "SYSTEM"}
    agent = Process([PILOTFISH, "agent", "--status-port", "0"], tmp_path / "agent.log", env=env, cwd=tmp_path)
    try:
        agent.wait_for(r"WARNING\s+agent: the token file \./var/run/secrets/tokens/istio-token is a directory: "
                       r"connecting without a bearer token")
        agent.wait_for(r"agent: no DNS proxy")
    finally:
        assert agent.stop() == 0


def test_saved_table_path_that_is_a_directory_is_refused_at_start(tmp_path: Path) -> None:
    """Otherwise every save fails (a warning per table) and no restart ever has a table."""
    (tmp_path / "cache").mkdir()
    proc = run_agent(tmp_path, {"PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}'},
                     "--nametable-cache", str(tmp_path / "cache"))
    assert_refused(proc, "--nametable-cache", "is a directory", str(tmp_path / "cache"))


def test_status_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    """Bound before anything runs, as the DNS proxy's ports: exit 1 with the port and the reason,
    not a traceback out of the trio nursery."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_agent(tmp_path, {"PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}', "PILOT_DISCOVERY_ADDRESS": "127.0.0.1:1",
                                    "PILOTFISH_NAMETABLE_CACHE": "", "CA_ROOT_CA": "SYSTEM"},
                         "--status-listen", f"127.0.0.1:{port}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"agent: status server cannot listen on port {port}: Address already in use" in proc.stderr


@pytest.mark.parametrize("argv", [["--version"], ["--help"], []])
def test_version_and_help_import_no_subcommand(argv: list[str]) -> None:
    """`pilotfish --version` imported every subcommand (trio, grpc, cryptography: ~0.5-0.7 s and
    54 MiB); with no subcommand chosen none is imported (issue 8)."""
    probe = (
        "import sys\n"
        "from pilotfish.agent import cli\n"
        "try:\n"
        f"    cli.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = [m for m in cli.SUBCOMMANDS.values() if m in sys.modules]\n"
        "heavy = [m for m in ('trio', 'grpc', 'cryptography') if m in sys.modules]\n"
        "print(loaded, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=False)
    assert done.stdout.strip().splitlines()[-1] == "[] []", done.stdout + done.stderr


def test_help_summaries_are_the_subcommands_own() -> None:
    import argparse

    from pilotfish.agent import cli

    for name in cli.SUBCOMMANDS:
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in sub._choices_actions}
        assert helps[name] == cli.SUMMARIES[name], name
