"""Reading and placing the files the control plane's flags name, with the reason in the error.

A flag's path is checked before anything is written, so a mistake is `--root-cert-out certs:
is a directory, not a file` at start, not a failure naming a temp file after the root CA was
made. Files are read with common/files.py, so a FIFO given by mistake is refused instead of
blocking the start (or a reload) on a read that never ends.
"""

from __future__ import annotations

import os


def check_output_path(path: str, directory: bool) -> str | None:
    """Why `path` cannot become a `directory` we create (or use), or a file we write by renaming
    a temp file over it; None if it can. Only what the file system says now: permissions show
    when writing (and root passes them)."""
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if directory and not os.path.isdir(full):
            return "not a directory"
        if not directory and os.path.isdir(full):
            return "is a directory, not a file"
        if not directory and not os.path.isfile(full):
            return "exists and is not a regular file (a device, a FIFO, a socket): not replaced"
        return None
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"{parent} is not a directory"
