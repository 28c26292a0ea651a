"""Reading the files the injection template mounts for the agent's configuration: the pod's
labels and annotations (downward API) and the mesh config file. Each is bounded: a ConfigMap
holds at most 1 MiB, a pod's annotations at most 256 KiB (quoting can double that).

As in Istio, labels and annotations that cannot be read are a warning and the agent goes on
without them; a mesh config file that exists but cannot be read is an error (Istio exits too).
"""

from __future__ import annotations

import logging

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.settings import ConfigError

from .downward import DownwardError, parse_downward

log = logging.getLogger("pilotfish.agent")

LABELS_FILE = "./etc/istio/pod/labels"
ANNOTATIONS_FILE = "./etc/istio/pod/annotations"
MAX_POD_INFO = 1 << 20
MAX_MESH_CONFIG = 1 << 20


def read_pod_info(path: str) -> dict[str, str] | None:
    """The `key="value"` file at `path` as a map; None when it is missing or unusable (said once)."""
    try:
        text = read_regular_file(path, MAX_POD_INFO).decode("utf-8", "surrogateescape")
        return parse_downward(text)
    except UnreadableFile as err:
        if not err.missing:
            log.warning("agent: pod info file %s %s: going on without it", path, err)
        return None
    except DownwardError as err:
        log.warning("agent: pod info file %s: %s: going on without it", path, err)
        return None


def read_mesh_config(path: str) -> str | None:
    """The mesh config file's text; None when there is none."""
    if not path:
        return None
    try:
        return read_regular_file(path, MAX_MESH_CONFIG).decode("utf-8", "replace")
    except UnreadableFile as err:
        if err.missing:
            return None
        raise ConfigError(f"--meshConfig: the mesh config file {err}: {path}") from None
