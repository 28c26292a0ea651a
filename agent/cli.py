"""The `pilotfish` command: one binary with a subcommand per job (dns now; init, agent and
controlplane as they land), like Istio's pilot-agent and istio-iptables in one image."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
import time

from pilotfish.dns import command as dns_command


def version() -> str:
    return importlib.metadata.version("pilotfish")


class _Formatter(logging.Formatter):
    """One line per event: UTC time with milliseconds, level, message (Istio's layout)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s\t%(levelname)s\t%(message)s"))
    root = logging.getLogger("pilotfish")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilotfish",
        description="Service-mesh sidecar agent: a drop-in for Istio's istio-init and pilot-agent.",
    )
    parser.add_argument("--version", action="version", version=f"pilotfish {version()}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dns_command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
