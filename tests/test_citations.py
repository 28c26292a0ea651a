"""Comments and docstrings cite files of this repository, never material outside it.

What the code relies on from Istio is written down once, in docs/istio-compat.md, and the code
cites it as `docs/istio-compat.md "Section"`. A pointer to the reference notes that stood beside
the repository (`reference/istio-agent.md §2.1`, `../shared`, `measurements.md`), or to Istio's
Go sources (`pkg/keepalive/options.go`), cannot be followed by whoever reads the code, and goes
stale without anyone noticing. So:

- the packages' comments and docstrings (agent, common, controlplane, dns, init, xds_client; not
  the generated xds_client/proto) hold no such pointer: the fact goes into docs/istio-compat.md
  and the comment cites the section;
- every `docs/istio-compat.md "Section"` citation, in the packages, tests/ and bench/ (this file
  aside: it shows the form), names a section that exists, so a renamed heading cannot leave
  citations dangling.

Standards' sections (`RFC 1035 §4.1.2`, `YAML 1.2 §3.2.1.1`) are citations a reader can follow
and are not flagged; a bare `§N` is (it was always a section of one of those reference notes).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "common", "controlplane", "dns", "init", "xds_client")
GENERATED = ROOT / "xds_client" / "proto"
COMPAT = ROOT / "docs" / "istio-compat.md"

# What points outside the repository, and how to say why.
OUTSIDE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?<![\w/-])reference(?:/[\w.-]+| §)"), "the reference notes outside the repository"),
    (re.compile(r"\.\./(?:shared|testdata)\b|\bshared/(?:reference|testdata)\b"), "../shared"),
    (re.compile(r"(?<![\w/-])(?:design|measurements|peers|istio-agent|istio-dns-proxy|istio-iptables"
                r"|istio-dropin-audit)\.md\b"), "a document outside the repository"),
    (re.compile(r"(?<![\w/.-])[\w/-]*\w\.go\b"), "a Go source file"),
    (re.compile(r"(?<![\w/.-])(?:pkg|pilot|tools|security|cni|manifests|istioctl)/\w"), "an Istio source path"),
)
# A section of a standard, possibly several: "RFC 2181 §9", "RFC 1035 §4.1.2, §5", "YAML 1.2 §3.2.1.1".
STANDARD_SECTION = re.compile(
    r"(?:RFC\s*\d+|YAML\s*\d+(?:\.\d+)*),?\s*§\s*[\d.]*\d(?:\s*(?:,|/|–|and|or)\s*§\s*[\d.]*\d)*")
# `docs/istio-compat.md "A"`, `... "A" and "B"`, `... "A", "B"`.
COMPAT_CITATION = re.compile(r'istio-compat\.md[\s,:]*((?:"[^"\n]+"(?:\s*(?:,|and)\s*)?)+)')
QUOTED = re.compile(r'"([^"\n]+)"')


def _sources(dirs: tuple[str, ...]) -> Iterator[Path]:
    for name in dirs:
        for path in sorted((ROOT / name).rglob("*.py")):
            if GENERATED not in path.parents:
                yield path


def _texts(path: Path) -> Iterator[tuple[int, str]]:
    """(first line, text) of each docstring and each run of comment lines on consecutive lines
    (joined, without the `#`, so that a citation wrapped over two comment lines is read whole)."""
    source = path.read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield body[0].lineno, body[0].value.value
    run: list[str] = []
    start = last = 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        if run and line != last + 1:
            yield start, "\n".join(run)
            run = []
        if not run:
            start = line
        run.append(tok.string.lstrip("#").strip())
        last = line
    if run:
        yield start, "\n".join(run)


def outside_citations(text: str) -> list[tuple[int, str, str]]:
    """(offset, what matched, why) for every pointer outside the repository in `text`."""
    found = [(m.start(), m.group(0), why) for pattern, why in OUTSIDE for m in pattern.finditer(text)]
    # What is left once standards' sections and the matches above are blanked out (same offsets).
    rest = STANDARD_SECTION.sub(lambda m: " " * len(m.group(0)), text)
    for start, match, _ in found:
        rest = rest[:start] + " " * len(match) + rest[start + len(match):]
    found += [(m.start(), rest[m.start():m.start() + 10].split("\n")[0],
               "a bare section number of a reference note") for m in re.finditer("§", rest)]
    return sorted(found)


def compat_sections() -> set[str]:
    return {line[3:].strip() for line in COMPAT.read_text(encoding="utf-8").splitlines()
            if line.startswith("## ")}


def test_the_patterns_flag_what_points_outside_and_nothing_else() -> None:
    """The patterns themselves: each kind of pointer found in the code once is caught, and the
    legitimate texts that look like them are not."""
    flagged = [
        "reference/istio-agent.md §2.1", "(reference §12.3)", "(§2.2)", "§4 step 14",
        "shared/reference/measurements.md", "../shared/testdata/dns/cases.json", "(measurements.md)",
        "(design.md)", "peers.md B1", "pkg/keepalive/options.go", "xds_proxy.go",
        "(pkg/istio-agent/metrics, ...)", "pilot/pkg/grpc ClientOptions", "tools/istio-iptables/pkg/",
    ]
    for text in flagged:
        assert outside_citations(text), text
    legitimate = [
        "RFC 1035 §4.1.2", "RFC 5280 §4.1: a SEQUENCE", "RFC 2181 §9 and miekg/dns `Truncate`",
        "YAML 1.2 §3.2.1.1: keys are unique", "RFC 1035 §4.1.2, §5", "RFC 6891 §6.1.3",
        'docs/istio-compat.md "ADS stream to istiod"', "docs/dns.md, \"Bounds\"", "miekg/dns",
        "Go's ParseBool", "the reference count says", "a reference assignment", "tests/dns/data/cases.json",
        "common/settings.py", "xds_client/proto", "./var/run/secrets/istio/root-cert.pem", "golden files",
    ]
    for text in legitimate:
        assert not outside_citations(text), (text, outside_citations(text))


def test_packages_cite_nothing_outside_the_repository() -> None:
    problems = [f"{path.relative_to(ROOT)}:{line + text.count(chr(10), 0, at)}: {match!r} ({why})"
                for path in _sources(PACKAGES) for line, text in _texts(path)
                for at, match, why in outside_citations(text)]
    assert not problems, ("comments and docstrings cite docs/istio-compat.md \"Section\" instead "
                          "(add the fact there if it is missing):\n" + "\n".join(problems))


def test_every_compat_citation_names_a_section() -> None:
    sections = compat_sections()
    assert "ADS stream to istiod" in sections  # the doc is read as the headings it has
    problems = [f"{path.relative_to(ROOT)}:{line}: {name!r}"
                for path in _sources(PACKAGES + ("tests", "bench")) if path != Path(__file__).resolve()
                for line, text in _texts(path)
                for citation in COMPAT_CITATION.finditer(text)
                for name in QUOTED.findall(citation.group(1)) if name not in sections]
    assert not problems, (f"no such section in {COMPAT.relative_to(ROOT)} (its `## ` headings: "
                          f"{sorted(sections)}):\n" + "\n".join(problems))
