"""Reading a NameTable from a file in protobuf's JSON mapping (what `pilotfish dns` serves).

The same shape istiod's NDS resource has, so a table dumped from Istio's /debug/ndsz (minus the
generated alias keys) or written by hand works:
`{"table": {"host": {"ips": [...], "registry": "Kubernetes", "shortname": ..., "namespace": ...,
"altHosts": [...]}}}` (`alt_hosts` is accepted too).
"""

from __future__ import annotations

import json
import os

from google.protobuf import json_format

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

# The file is read whole: this bound stops a wrong path (a disk image, a log) from being read
# into memory. 1 GiB is seven times the file of a 1,000,000-service table (137 MB).
TABLE_FILE_MAX = 1 << 30


class TableFileError(ValueError):
    """The file cannot be read or is not a NameTable; the message says which and why."""


# Both parsers recurse once per level of nesting, so a file nested deeper than Python's recursion
# limit (about 1,000 levels; a NameTable is four deep) raises RecursionError: bad input like any
# other, not a crash of the running proxy.
TOO_DEEP = "nested too deeply to be a NameTable (one is four levels deep)"


def load_name_table(path: str) -> NameTable:
    """Parse the file; every failure is a TableFileError naming the file."""
    try:
        text = read_regular_file(path, TABLE_FILE_MAX)
    except UnreadableFile as err:
        raise TableFileError(f"{path}: {err}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise TableFileError(f"{path}: {TOO_DEEP}") from None
    except ValueError as err:
        raise TableFileError(f"{path}: not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("table", {}), dict):
        raise TableFileError(f'{path}: want an object {{"table": {{host: NameInfo}}}}')
    try:
        return json_format.ParseDict(data, NameTable())
    except json_format.ParseError as err:
        raise TableFileError(f"{path}: not a NameTable: {err}") from None
    except RecursionError:
        raise TableFileError(f"{path}: {TOO_DEEP}") from None


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (None while it is missing)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
