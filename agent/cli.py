"""The `pilotfish` command: one binary with a subcommand per job (dns, init; agent and
controlplane as they land), like Istio's pilot-agent and istio-iptables in one image.

Subcommands are imported when chosen: `pilotfish init` runs in an init container on every pod
start and must not pay for the DNS proxy's imports (trio, protobuf, prometheus-client).
"""

from __future__ import annotations

import argparse
import os
import sys

from pilotfish.agent.logs import setup_logging


def version() -> str:
    import importlib.metadata  # ~10 ms: only for --version

    return importlib.metadata.version("pilotfish")


def build_parser() -> argparse.ArgumentParser:
    from pilotfish.agent import command as agent_command
    from pilotfish.controlplane import command as controlplane_command
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
    controlplane_command.add_parser(sub)
    agent_command.add_parser(sub)
    sub.add_parser("init", add_help=False,
                   help="install the traffic capture rules (istio-iptables' flags; init --help)")
    return parser


def _init_arguments(argv: list[str]) -> tuple[list[str], str | None] | None:
    """If the command is `init`, its arguments and any global --log-level before it.

    istio-iptables' flags follow pflag's rules, not argparse's, so init parses its own.
    """
    level = None
    i = 0
    while i < len(argv) and argv[i].startswith("--log-level"):
        name, has_value, value = argv[i].partition("=")
        if name != "--log-level":
            return None
        if not has_value and i + 1 < len(argv):
            i += 1
            value = argv[i]
        level = value
        i += 1
    if i < len(argv) and argv[i] == "init":
        return argv[i + 1 :], level
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    init = _init_arguments(argv)
    if init is not None:
        from pilotfish.init import command as init_command

        init_argv, level = init
        if level is not None:
            init_argv = [f"--log_output_level={level}", *init_argv]
        return init_command.main(init_argv, os.environ)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, getattr(args, "log_format", "text"))
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
