"""`pilotfish vm install|uninstall|status` (docs/vm.md)."""

from __future__ import annotations

import argparse

SUMMARY = "install pilotfish as a VM's mesh sidecar from Istio's VM files, show its status, or uninstall it"


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(name, help=SUMMARY, description=SUMMARY, allow_abbrev=False)
    p.add_argument("action", choices=("install", "uninstall", "status"),
                   help="install: check then install the files, user, links and unit, and start it under systemd; "
                        "uninstall: undo exactly what install did; status: one line per check, exit 1 if any fails")
    p.add_argument("--files", metavar="DIR",
                   help="install: the directory `istioctl x workload entry configure -o DIR` wrote")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="the file system root to install under, uninstall from or read the certificate from "
                        "(default /; another root is for tests and images: no accounts or systemd are touched)")
    p.add_argument("--status-port", type=int, default=15020, metavar="PORT",
                   help="status: the agent's status port (ProxyConfig statusPort, default 15020)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "install":
        if not args.files:
            print("vm install: --files DIR is required (the directory istioctl wrote the VM files to)")
            return 2
        from .install import install

        return install(args.files, args.root)
    if args.action == "uninstall":
        from .install import uninstall

        return uninstall(args.root)
    from .gather import gather
    from .health import checks, render

    results = checks(gather(args.root, args.status_port))
    print(render(results), end="")
    return 0 if all(c.ok for c in results) else 1
