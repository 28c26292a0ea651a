"""The gRPC headers of every stream: ClusterID, XDS_HEADER_*, the bearer token."""

from __future__ import annotations

from pathlib import Path

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
