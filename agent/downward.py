"""The pod's labels and annotations as Kubernetes' downward API writes them into files
(`./etc/istio/pod/labels`, `./etc/istio/pod/annotations` in Istio's injection template): one
`key="value"` per line, the value quoted as Go's `%q` does. Pure parsing here; agent/podinfo.py
reads the files.

As Istio's `ParseDownwardAPI` (docs/istio-compat.md "Configuration sources"): a line
without `=` is skipped, and a value that does not unquote makes the whole file unreadable (Istio
then goes on without it, with a warning).
"""

from __future__ import annotations

_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
_HEX = {"x": 2, "u": 4, "U": 8}


class DownwardError(ValueError):
    """A line whose value is not a Go double-quoted string."""


def go_unquote(text: str) -> str:
    """A Go double-quoted string literal's value (strconv.Unquote for `"..."`).

    Escapes: \\a \\b \\f \\n \\r \\t \\v \\\\ \\" , \\xNN and three-digit octal (bytes, so a
    sequence of them may spell UTF-8), \\uNNNN and \\UNNNNNNNN (code points). Raw newlines,
    unescaped quotes and unknown escapes are errors, as in Go."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise DownwardError("not a double-quoted string")
    out = bytearray()
    body = text[1:-1]
    i = 0
    while i < len(body):
        c = body[i]
        if c == '"' or c == "\n":
            raise DownwardError(f"unescaped {c!r} inside the quotes")
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise DownwardError("a lone backslash at the end")
        e = body[i + 1]
        if e in _SIMPLE:
            out += _SIMPLE[e].encode()
            i += 2
        elif e in _HEX:
            digits = body[i + 2 : i + 2 + _HEX[e]]
            if len(digits) != _HEX[e] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise DownwardError(f"bad \\{e} escape")
            value = int(digits, 16)
            if e == "x":
                out.append(value)
            else:
                if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                    raise DownwardError(f"\\{e}{digits} is not a code point")
                out += chr(value).encode()
            i += 2 + _HEX[e]
        elif e in "01234567":
            digits = body[i + 1 : i + 4]
            if len(digits) != 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
                raise DownwardError("bad octal escape")
            out.append(int(digits, 8))
            i += 4
        else:
            raise DownwardError(f"unknown escape \\{e}")
    return out.decode("utf-8", "replace")


def parse_downward(text: str) -> dict[str, str]:
    """`key="value"` lines as a map; DownwardError (naming the line) when a value does not unquote."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), 1):
        key, has_value, value = line.partition("=")
        if not has_value:
            continue
        try:
            out[key] = go_unquote(value)
        except DownwardError as err:
            raise DownwardError(f"line {number} ({key}): {err}") from None
    return out
