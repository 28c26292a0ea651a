"""A gRPC server's unix socket, as the agent's servers for Envoy have it (SDS, the xDS proxy):
born 0600, in a directory made 0700 when we make it. Envoy runs as the agent's user, and
whoever else could connect would get the workload's key (SDS) or the mesh's configuration and
a stream to the control plane under the pod's identity (the xDS proxy).
"""

from __future__ import annotations

import os

import grpc
from pilotfish.common.dirs import make_dirs

SUN_PATH_MAX = 107  # bytes of a unix socket's path (sockaddr_un.sun_path, less the NUL)


def listen_unix(server: grpc.Server, path: str) -> None:
    """Bind `server` (not started yet) to a socket at `path`, replacing a socket left there by an
    earlier run. OSError when it cannot be made."""
    make_dirs(os.path.dirname(os.path.abspath(path)), 0o700)
    if len(os.fsencode(path)) > SUN_PATH_MAX:  # as given: a relative path is short where an absolute one is not
        raise OSError(f"the socket's path is longer than a unix socket allows ({SUN_PATH_MAX} bytes)")
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)  # the socket is born 0600: never a moment when others could connect
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as err:  # grpcio raises where it once returned 0
        raise OSError(str(err)) from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
