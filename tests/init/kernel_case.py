"""Run inside a network namespace (`ip netns exec NS python kernel_case.py CASE BACKEND MODE`):
apply one of Istio's golden cases with one backend, in-process, and print a JSON report.

MODE `rerun`: apply, then plan again and report whether pilotfish sees anything left to change
(it must not: that proves the canonical form matches what the kernel reports).
MODE `fail`: apply with a backend that commits the first changed table of the last family and
then fails; the run must roll every table back.
Group names the cases use but this machine lacks are swapped for existing groups.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

sys.path.insert(0, __file__.rsplit("/", 1)[0])

from golden import case_config  # noqa: E402

from pilotfish.init.apply import ApplyError, run_tables  # noqa: E402
from pilotfish.init.backends import BACKENDS, Backend, BackendError  # noqa: E402
from pilotfish.init.command import _canon  # noqa: E402
from pilotfish.init.planner import plan  # noqa: E402

GROUPS = {"java": "daemon", "ftp": "sys"}


def failing(backend: Backend, last_family: int) -> Backend:
    """The same backend, except that the last family commits one table and then fails."""

    class Failing(type(backend)):  # type: ignore[misc, valid-type]
        def apply(self, family: int, ops: dict) -> None:  # type: ignore[override]
            if family != last_family:
                return super().apply(family, ops)
            first = next(t for t, o in ops.items() if o)
            super().apply(family, {first: ops[first]})
            raise BackendError(f"injected failure after committing the {first} table")

    return Failing(backend.runner)


def main() -> None:
    name, backend_name, mode = sys.argv[1:4]
    config, detected = case_config(name)
    for field in ("owner_groups_include", "owner_groups_exclude"):
        value = getattr(config, field)
        config = replace(config, **{field: ",".join(GROUPS.get(g, g) for g in value.split(","))})
    the_plan = plan(config, detected)
    backend = BACKENDS[backend_name]()
    if mode == "rerun":
        first = run_tables(backend, the_plan, _canon)
        second = run_tables(backend, the_plan, _canon)
        print(json.dumps({"first_changed": first.changed, "second_changed": second.changed, "diff": second.diff}))
        return
    try:
        run_tables(failing(backend, the_plan.families[-1]), the_plan, _canon)
        print(json.dumps({"error": None}))
    except ApplyError as err:
        print(json.dumps({"error": str(err)}))


if __name__ == "__main__":
    main()
