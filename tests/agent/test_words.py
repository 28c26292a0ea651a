"""pilot-agent's words and flags as a real process: `version`, `wait`, `request`, unknown flags
accepted with one warning, `--meshConfig` read (agent/cli.py, agent/localwords.py)."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import PILOTFISH

from pilotfish.agent.cli import drop_unknown_flags

PILOT_AGENT = str(Path(PILOTFISH).with_name("pilot-agent"))


def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PILOT_AGENT, *argv], capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
                          env=env)


@pytest.mark.parametrize(("args", "kept", "dropped"), [
    (["--known", "1", "--new=2", "x"], ["--known", "1", "x"], ["--new=2"]),
    (["--new", "value", "--known"], ["--known"], ["--new", "value"]),
    (["--new", "--known", "v"], ["--known", "v"], ["--new"]),
    (["--", "--new"], ["--", "--new"], []),
])
def test_unknown_flags_are_dropped_as_pflag_skips_them(args: list[str], kept: list[str], dropped: list[str]) -> None:
    assert drop_unknown_flags(args, {"--known"}) == (kept, dropped)


def test_version_word() -> None:
    done = run("version")
    assert done.returncode == 0 and done.stdout.startswith("pilotfish "), done.stderr


def test_unknown_flags_are_one_warning_and_known_ones_still_count(tmp_path: Path) -> None:
    """A flag a newer template adds must not stop the pod: one warning naming it, then the
    agent goes on (here to refuse a mesh file that does not parse, proving --meshConfig is read)."""
    mesh = tmp_path / "mesh"
    mesh.write_text("defaultConfig: [unclosed\n")
    done = run("proxy", "sidecar", "--someNewFlag", "x", "--other=1", "--meshConfig", str(mesh),
               "--status-port", "0", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    warnings = [line for line in done.stderr.splitlines() if "ignoring unknown flags" in line]
    assert warnings and len(warnings) == 1 and "--someNewFlag x --other=1" in warnings[0], done.stderr
    assert done.returncode == 2 and f"mesh config file {mesh}" in done.stderr, done.stderr


def test_request_refuses_ports_istio_refuses() -> None:
    done = run("request", "--debug-port", "22", "GET", "server_info")
    assert done.returncode == 1 and "debug port 22 is not in allowed list" in done.stderr, done.stderr
    assert done.stdout == ""


class _Flaky(http.server.BaseHTTPRequestHandler):
    """503 for the first `not_ready` requests, then 200."""

    not_ready = 2
    seen = 0

    def do_GET(self) -> None:  # noqa: N802  http.server's naming
        type(self).seen += 1
        self.send_response(503 if self.seen <= self.not_ready else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Handler", (_Flaky,), {"seen": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/healthz/ready", handler
    finally:
        server.shutdown()
        server.server_close()


def test_wait_polls_until_ready(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    done = run("wait", "--url", url, "--periodMillis", "20", "--timeoutSeconds", "30")
    assert done.returncode == 0 and "Envoy is ready!" in done.stderr, done.stderr
    assert handler.seen == 3


def test_wait_gives_up_with_the_last_error(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    handler.not_ready = 10**6
    done = run("wait", "--url", url, "--periodMillis", "20", "--timeoutSeconds", "1")
    assert done.returncode == 1 and "Last error: HTTP status code 503" in done.stderr, done.stderr


def test_pod_annotations_file_is_a_config_source(tmp_path: Path) -> None:
    """./etc/istio/pod/annotations (downward API, Go-quoted) is read: a bad proxy.istio.io/config
    there is refused naming the annotation."""
    pod = tmp_path / "etc/istio/pod"
    pod.mkdir(parents=True)
    (pod / "annotations").write_text('proxy.istio.io/config="statusPort: [1, 2]"\nother="x"\n')
    done = run("proxy", "--status-port", "0", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "annotation proxy.istio.io/config: statusPort" in done.stderr, done.stderr


def test_a_config_path_that_cannot_be_made_is_one_error_and_exit_1(tmp_path: Path) -> None:
    """ProxyConfig.configPath under a file: neither the xDS socket nor Envoy's bootstrap can be
    made there; one error line naming it, every part stopped, exit status 1, no traceback."""
    (tmp_path / "file").write_text("")
    env = {"PATH": "/usr/bin:/bin", "CA_ROOT_CA": "SYSTEM",
           "PROXY_CONFIG": json.dumps({"controlPlaneAuthPolicy": "NONE", "configPath": str(tmp_path / "file/x"),
                                       "discoveryAddress": "127.0.0.1:1"})}
    done = run("proxy", "--status-listen", "127.0.0.1:0", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"{tmp_path}/file/x/" in errors[0], errors


def test_envoy_binary_flag_is_checked_at_start(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CA_ROOT_CA": "SYSTEM", "PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}'}
    done = run("proxy", "--status-port", "0", "--envoy-binary", "/nonexistent/envoy", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "--envoy-binary): no Envoy binary at '/nonexistent/envoy'" in done.stderr, \
        done.stderr


def test_an_envoy_that_cannot_run_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "envoy").write_text("not a program")  # exists, not executable
    env = {"PATH": "/usr/bin:/bin", "CA_ROOT_CA": "SYSTEM", "PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}'}
    done = run("proxy", "--status-listen", "127.0.0.1:0", "--envoy-binary", str(tmp_path / "envoy"), cwd=tmp_path,
               env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"'{tmp_path}/envoy' is not an executable file" in done.stderr, done.stderr
