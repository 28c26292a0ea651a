"""The `pilotfish` command: one binary with a subcommand per job (dns, init, agent,
controlplane), like Istio's pilot-agent and istio-iptables in one image.

Only the chosen subcommand's module is imported: `pilotfish init` runs in an init container on
every pod start and must not pay for the DNS proxy's imports (trio, protobuf, prometheus-client),
and the agent must not carry the control plane's (cryptography, ~6 MB of memory).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pilotfish.common.logs import setup_logging

SUBCOMMANDS = {
    "dns": "pilotfish.dns.command",
    "agent": "pilotfish.agent.command",
    "controlplane": "pilotfish.controlplane.command",
}
# What `pilotfish --help` says of each, without importing it (all three: ~0.7 s and 54 MiB; the
# subcommand's own parser says the same, tests/agent/test_cli.py checks they agree).
SUMMARIES = {
    "dns": "run the DNS proxy with a NameTable from a file",
    "agent": "run the agent: xDS client, DNS proxy fed by it, status server",
    "controlplane": "run a small control plane: NameTables and a sidecar's Envoy config over istiod's xDS, with its own CA",
}


class _Version(argparse.Action):
    """--version, reading the installed version only when asked (importlib.metadata costs ~10 ms)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        import importlib.metadata

        print(f"pilotfish {importlib.metadata.version('pilotfish')}")
        parser.exit()


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the `chosen` subcommand's module is imported, the others get a parser
    with their summary only (never used to parse: another subcommand, or none, was chosen;
    `--version` and `--help` import no subcommand)."""
    parser = argparse.ArgumentParser(
        prog="pilotfish",
        description="Service-mesh sidecar agent: a drop-in for Istio's istio-init and pilot-agent.",
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if chosen == name:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=SUMMARIES[name])
    sub.add_parser("init", add_help=False,
                   help="install the traffic capture rules (istio-iptables' flags; init --help)")
    return parser


def command_word(argv: list[str]) -> tuple[str | None, str | None, int]:
    """(subcommand, global --log-level if given, index of the subcommand) of a command line."""
    level = None
    i = 0
    while i < len(argv) and argv[i].startswith("--log-level"):
        name, has_value, value = argv[i].partition("=")
        if name != "--log-level":
            break
        if not has_value and i + 1 < len(argv):
            i += 1
            value = argv[i]
        level = value
        i += 1
    word = argv[i] if i < len(argv) and not argv[i].startswith("-") else None
    return word, level, i


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # grpc's C core logs to stderr in its own format; pilotfish logs its events itself.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    word, level, at = command_word(argv)
    if word == "init":
        # istio-iptables' flags follow pflag's rules, not argparse's: init parses its own.
        from pilotfish.init import command as init_command

        init_argv = argv[at + 1 :]
        if level is not None:
            init_argv = [f"--log_output_level={level}", *init_argv]
        return init_command.main(init_argv, os.environ)
    args = build_parser(word if word in SUBCOMMANDS else None).parse_args(argv)
    setup_logging(args.log_level, getattr(args, "log_format", "text"))
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
