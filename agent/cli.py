"""The `pilotfish` and `pilot-agent` commands: one CLI with a word per job.

pilotfish's words: `dns`, `init`, `agent`, `controlplane`, `vm` (install on a VM, docs/vm.md). pilot-agent's words, as Istio's
injection template and tools call them (docs/istio-compat.md "pilot-agent words"): `proxy
[sidecar|router]` (the agent with Envoy), `istio-iptables` (= `init`), `request`, `wait`,
`version`. Both programs accept every word.

As pilot-agent (cobra with unknown flags whitelisted), the agent's words accept flags they do not
know with one warning: a flag a newer injection template adds must not stop a pod. A flag given
as `--name value` takes the value with it, as pflag skips it.

Only the chosen word's module is imported: `pilotfish init` runs in an init container on every
pod start and must not pay for the DNS proxy's imports (trio, protobuf, prometheus-client), and
the agent must not carry the control plane's (cryptography, ~6 MB of memory).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pilotfish.common.logs import istio_level, setup_logging

SUBCOMMANDS = {
    "dns": "pilotfish.dns.command",
    "agent": "pilotfish.agent.command",
    "proxy": "pilotfish.agent.command",
    "controlplane": "pilotfish.controlplane.command",
    "request": "pilotfish.agent.localwords",
    "wait": "pilotfish.agent.localwords",
    "reference": "pilotfish.agent.reference",
    "vm": "pilotfish.agent.vm.command",
}
# What `--help` says of each, without importing it (all of them: ~0.7 s and 54 MiB; the word's
# own parser says the same, tests/agent/test_cli.py checks they agree).
SUMMARIES = {
    "dns": "run the DNS proxy with a NameTable from a file",
    "agent": "run the agent: xDS client, DNS proxy fed by it, status server",
    "proxy": "run the agent with Envoy (pilot-agent proxy [sidecar|router])",
    "controlplane": "run a small control plane: NameTables and a sidecar's Envoy config over istiod's xDS, with its own CA",
    "request": "make an HTTP request to Envoy's admin API or the agent (pilot-agent request)",
    "wait": "wait until the proxy is ready (pilot-agent wait)",
    "reference": "print the configuration reference (every flag and variable) as Markdown",
    "vm": "install pilotfish as a VM's mesh sidecar from Istio's VM files, show its status, or uninstall it",
}
INIT_WORDS = ("init", "istio-iptables")
# words that accept unknown flags with a warning, as pilot-agent's
LENIENT = ("agent", "proxy", "request", "wait", "version")

log = logging.getLogger("pilotfish")


def _version() -> str:
    import importlib.metadata  # ~10 ms: only when asked

    return importlib.metadata.version("pilotfish")


class _Version(argparse.Action):
    """--version, reading the installed version only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"pilotfish {_version()}")
        parser.exit()


def build_parser(chosen: str | None = None, prog: str = "pilotfish") -> argparse.ArgumentParser:
    """The parser; only the `chosen` word's module is imported, the others get a parser with
    their summary only (never used to parse: another word, or none, was chosen; `--version` and
    `--help` import no word's module)."""
    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Service-mesh sidecar agent: a drop-in for Istio's istio-init and pilot-agent.",
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="log level (default info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if chosen == name:
            importlib.import_module(module).add_parser(sub, name)
        else:
            sub.add_parser(name, help=SUMMARIES[name])
    sub.add_parser("init", add_help=False,
                   help="install the traffic capture rules (istio-iptables' flags; init --help)")
    sub.add_parser("istio-iptables", add_help=False, help="the same as init (pilot-agent istio-iptables)")
    sub.add_parser("version", help="print the version")
    return parser


def command_word(argv: list[str]) -> tuple[str | None, str | None, int]:
    """(word, global --log-level if given, index of the word) of a command line."""
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


def known_flags(parser: argparse.ArgumentParser, word: str) -> set[str]:
    for action in parser._subparsers._group_actions if parser._subparsers else []:  # noqa: SLF001
        choice = getattr(action, "choices", {}).get(word)
        if choice is not None:
            return set(choice._option_string_actions)  # noqa: SLF001
    return set()


def drop_unknown_flags(args: list[str], known: set[str]) -> tuple[list[str], list[str]]:
    """(args without the flags not in `known`, those dropped). As pflag skips an unknown flag:
    `--name=value` alone, `--name value` with the value when it does not look like a flag."""
    kept: list[str] = []
    dropped: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            kept += args[i:]
            break
        name = arg.partition("=")[0]
        if arg.startswith("-") and len(arg) > 1 and name not in known:
            dropped.append(arg)
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("-"):
                dropped.append(args[i + 1])
                i += 1
        else:
            kept.append(arg)
        i += 1
    return kept, dropped


def main(argv: list[str] | None = None, prog: str = "pilotfish") -> int:
    argv = sys.argv[1:] if argv is None else argv
    # grpc's C core logs to stderr in its own format; pilotfish logs its events itself.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    word, level, at = command_word(argv)
    if word in INIT_WORDS:
        # istio-iptables' flags follow pflag's rules, not argparse's: init parses its own.
        from pilotfish.init import command as init_command

        init_argv = argv[at + 1 :]
        if level is not None:
            init_argv = [f"--log_output_level={level}", *init_argv]
        return init_command.main(init_argv, os.environ)
    parser = build_parser(word if word in SUBCOMMANDS else None, prog)
    dropped: list[str] = []
    if word in LENIENT:
        rest, dropped = drop_unknown_flags(argv[at + 1 :], known_flags(parser, word) | {"-h", "--help"})
        argv = [*argv[: at + 1], *rest]
    args = parser.parse_args(argv)
    output_level = istio_level(getattr(args, "log_output_level", None) or "")
    as_json = str(getattr(args, "log_as_json", "false")).lower() in ("1", "t", "true")
    setup_logging(output_level or args.log_level, "json" if as_json else getattr(args, "log_format", "text"))
    if dropped:
        log.warning("%s %s: ignoring unknown flags: %s", prog, word, " ".join(dropped))
    if args.command == "version":
        print(f"pilotfish {_version()}")
        return 0
    return int(args.run(args))


def pilot_agent() -> int:
    """The `pilot-agent` console script: the same CLI under Istio's name."""
    return main(prog="pilot-agent")


if __name__ == "__main__":
    sys.exit(main())
