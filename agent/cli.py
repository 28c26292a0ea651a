"""The `pilotfish` command: one binary with a subcommand per job (dns, init; agent and
controlplane as they land), like Istio's pilot-agent and istio-iptables in one image.

Subcommands are imported when chosen: `pilotfish init` runs in an init container on every pod
start and must not pay for the DNS proxy's imports (trio, protobuf, prometheus-client).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from pilotfish.agent.logs import setup_logging


def version() -> str:
    return importlib.metadata.version("pilotfish")


def build_parser() -> argparse.ArgumentParser:
    from pilotfish.dns import command as dns_command

    parser = argparse.ArgumentParser(
        prog="pilotfish",
        description="Service-mesh sidecar agent: a drop-in for Istio's istio-init and pilot-agent.",
    )
    parser.add_argument("--version", action="version", version=f"pilotfish {version()}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dns_command.add_parser(sub)
    sub.add_parser("init", add_help=False,
                   help="install the traffic capture rules (istio-iptables' flags; init --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "init":
        # istio-iptables' flags follow pflag's rules, not argparse's: init parses its own.
        from pilotfish.init import command as init_command

        return init_command.main(argv[1:], os.environ)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
