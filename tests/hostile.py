"""Hostile inputs shared by tests of more than one folder (importable as `hostile`: tests/conftest.py
puts this folder on sys.path)."""

from __future__ import annotations


def billion_laughs(levels: int = 9) -> str:
    """A ProxyConfig of a few hundred bytes of YAML that parses at once into lists shared
    10**levels times over, under proxyMetadata: turning it into text never ends."""
    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"proxyMetadata: {{ISTIO_META_X: *a{levels}}}"]) + "\n"
