"""The channel to the control plane: the gRPC headers of every stream (ClusterID, XDS_HEADER_*, the
bearer token), one channel until the root file changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilotfish.xds_client.channel import XdsChannel, XdsSettings


def test_headers_and_binary_headers_as_bytes(tmp_path: Path) -> None:
    """A `-bin` header's value goes as bytes, the environment's own (grpcio raised a TypeError
    for a str, in the stream's thread, and the agent died)."""
    token = tmp_path / "token"
    token.write_text("abc\n")
    settings = XdsSettings("a:1", "a", None, str(token), cluster_id="Kubernetes",
                           headers=(("X-Team", "blue"), ("Trace-Bin", "\udcff\x00")))
    metadata = XdsChannel(settings).metadata()
    assert metadata == [("clusterid", "Kubernetes"), ("x-team", "blue"), ("trace-bin", b"\xff\x00"),
                        ("authorization", "Bearer abc")]


def test_one_channel_until_the_root_file_changes(tmp_path: Path) -> None:
    """A stream opened after the control plane's root was rotated uses it (a new channel); an
    unreadable root fails the stream, not the process."""
    root = tmp_path / "root.pem"
    root.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    channel = XdsChannel(XdsSettings("127.0.0.1:1", "istiod", str(root), "/nonexistent"))
    channel.stub()
    first = channel._channel
    channel.stub()
    assert channel._channel is first
    root.write_bytes(b"-----BEGIN CERTIFICATE-----\nrotated\n")
    channel.stub()
    assert channel._channel is not first
    root.unlink()
    with pytest.raises(OSError):
        channel.stub()
    channel.close()
