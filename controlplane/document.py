"""A mesh file's text as plain values (dicts, lists, strings, numbers, booleans, None): fast, in
bounded memory, and without recursion.

Why not `yaml.load(text, Loader=CSafeLoader)`: measured on 100,000 services (13 MB of YAML),
it took ~20 s and ~900 MB. libyaml's C parser is quick, but CSafeLoader first composes the
whole document as a graph of Python node objects (a node and two position marks per value),
then PyYAML's Python constructor walks that graph again. Here the parser's events become values
as they arrive, so nothing but the result is kept (~5 s, ~300 MB for the same file), and a file
that is JSON (its first character `{`, as `kubectl get -o json` writes) is read by the json
module in a fraction of a second.

Neither path recurses, so a file nested 1,000 deep cannot end in a RecursionError: libyaml
refuses nesting beyond its limit (1,000) with a line and column; the pure-Python parser (PyYAML
without libyaml) and the builder below keep their state in lists; json's C decoder does recurse
and raises RecursionError, and such a file is then read as YAML, which says where it goes wrong.

The values are the ones `yaml.safe_load` gives (YAML 1.1 scalars, anchors and aliases, merge
keys `<<`); tags other than the scalar ones (`!!set`, `!!omap`, custom tags) are refused, as
nothing in a mesh file uses them. Redefining an anchor is allowed (YAML 1.2); the later one wins.
A key given twice in one mapping is an error (YAML 1.2 §3.2.1.1: keys are unique), where
safe_load keeps the last: a second `services:` block silently dropped the first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.error import Mark
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

_TAG = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ, _MERGE = _TAG + "str", _TAG + "map", _TAG + "seq", _TAG + "merge"
# The scalar types safe_load builds; each constructor is a plain function of one node.
_SCALARS = {tag: SafeConstructor.yaml_constructors[tag]
            for tag in (_TAG + t for t in ("null", "bool", "int", "float", "binary", "timestamp"))}
_NUMBERS = frozenset((_TAG + "int", _TAG + "float"))
MAX_NUMBER = 100  # characters of an int or float scalar
# json.loads reads a file in one C call that holds the GIL (SIGTERM waits): ~28 MiB a second of
# a mesh here. Larger JSON goes through the event path, slower but stoppable between events.
JSON_AT_ONCE = 24 << 20
# Entries merge keys (`<<`) may copy in one file: a chain of mappings each merging the last
# copies quadratically (107 KB of them took 1.2 GB); a real file merges a few small mappings.
MAX_MERGED = 1_000_000
_RESOLVER = Resolver()
# The first characters a plain scalar that is not a string can start with (digits, signs, `.`,
# `~`, `<`, `=`, y/n/t/f/o): any other plain scalar, and every quoted one, is a string without
# asking the resolver (most of a mesh file: names and keys).
_TYPED_FIRST = frozenset(_RESOLVER.yaml_implicit_resolvers)
assert None not in _TYPED_FIRST  # no resolver for every first character (PyYAML's safe set has none)
_CONSTRUCTOR = SafeConstructor()
_LEADING_SPACE = re.compile(r"\s*")


def load_document(text: str) -> Any:
    """The one document in `text`; None for an empty one. yaml.YAMLError (most with a mark)
    when the text is not valid YAML or uses what a mesh file cannot hold."""
    start = _LEADING_SPACE.match(text).end()  # type: ignore[union-attr]  # \s* always matches
    if text[start:start + 1] == "{" and len(text) <= JSON_AT_ONCE:
        try:
            return json.loads(text, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):
            pass  # YAML flow style, comments, or nested too deep: YAML reads it, or says why not
    # libyaml's parser when PyYAML was built with it (the wheels are), else PyYAML's own.
    parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        return _build(parser.get_event)
    finally:
        parser.dispose()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a duplicate key sends the text to the YAML path, which says where it is."""
    value = dict(pairs)
    if len(value) != len(pairs):
        raise ValueError("duplicate key")
    return value


class _Open:
    """A mapping or sequence whose end event has not come yet."""

    __slots__ = ("key", "mark", "merges", "value")

    def __init__(self, value: dict[Any, Any] | list[Any], mark: Mark) -> None:
        self.value = value
        self.mark = mark
        self.key: Any = _NO_KEY  # a mapping's key waiting for its value
        self.merges: list[dict[Any, Any] | list[dict[Any, Any]]] = []  # values of `<<` keys


_NO_KEY = object()
_MERGE_KEY = object()  # the value a `<<` key stands for until its mapping ends


def _build(next_event: Callable[[], Event]) -> Any:
    """Values from the parser's events, with an explicit stack instead of recursion."""
    next_event()  # StreamStartEvent
    event = next_event()
    if isinstance(event, StreamEndEvent):
        return None
    document_mark = event.start_mark  # DocumentStartEvent
    anchors: dict[str, Any] = {}
    stack: list[_Open] = []
    merge_budget = [MAX_MERGED]
    root: Any = None
    while True:
        event = next_event()
        kind = type(event)
        if kind is ScalarEvent:
            key_position = bool(stack) and isinstance(stack[-1].value, dict) and stack[-1].key is _NO_KEY
            value = _scalar(event, key_position)  # type: ignore[arg-type]
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            stack.append(_start(event))  # type: ignore[arg-type]
            if event.anchor is not None:  # type: ignore[attr-defined]
                anchors[event.anchor] = stack[-1].value  # type: ignore[attr-defined]
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            value = _end(stack.pop(), merge_budget)
        elif kind is AliasEvent:
            if event.anchor not in anchors:  # type: ignore[attr-defined]
                raise ComposerError(None, None, f"found undefined alias {event.anchor!r}",  # type: ignore[attr-defined]
                                    event.start_mark)
            value = anchors[event.anchor]  # type: ignore[attr-defined]
        else:  # DocumentEndEvent
            assert kind is DocumentEndEvent
            break
        if kind is ScalarEvent and event.anchor is not None:  # type: ignore[attr-defined]
            anchors[event.anchor] = value  # type: ignore[attr-defined]
        if stack:
            _add(stack[-1], value, event)
        else:
            root = value
    event = next_event()
    if not isinstance(event, StreamEndEvent):
        raise ComposerError("expected a single document in the stream", document_mark,
                            "but found another document", event.start_mark)
    return root


def _scalar(event: ScalarEvent, key_position: bool) -> Any:
    tag = event.tag
    if tag is None or tag == "!":
        value = event.value
        if not event.implicit[0] or value[:1] not in _TYPED_FIRST:
            return value
        tag = _RESOLVER.resolve(ScalarNode, value, event.implicit)
    if tag == _STR:
        return event.value
    if tag == _MERGE and key_position:
        return _MERGE_KEY
    if tag == _TAG + "value" and key_position:  # `=` as a key is a plain string, as in PyYAML
        return event.value
    construct = _SCALARS.get(tag)
    if construct is None:
        raise ConstructorError(None, None, f"could not determine a constructor for the tag {tag!r}",
                               event.start_mark)
    if tag in _NUMBERS and len(event.value) > MAX_NUMBER:
        # PyYAML reads a YAML 1.1 base-60 integer (1:59:59:...) in quadratic time: 600 KB of one
        # took 11 s. No number in a mesh file (a port, a weight) is longer than a few digits.
        raise ConstructorError(None, None, f"a number of {len(event.value)} characters (at most {MAX_NUMBER})",
                               event.start_mark)
    return construct(_CONSTRUCTOR, ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style))


def _start(event: MappingStartEvent | SequenceStartEvent) -> _Open:
    mapping = isinstance(event, MappingStartEvent)
    if event.tag not in (None, "!", _MAP if mapping else _SEQ):
        raise ConstructorError(None, None, f"could not determine a constructor for the tag {event.tag!r}",
                               event.start_mark)
    return _Open({} if mapping else [], event.start_mark)


def _add(parent: _Open, value: Any, event: Event) -> None:
    """Put `value` into the open collection: appended, or as a mapping's key or value."""
    if isinstance(parent.value, list):
        parent.value.append(value)
    elif parent.key is _NO_KEY:
        if isinstance(value, (dict, list)):
            raise ConstructorError("while constructing a mapping", parent.mark, "found unhashable key",
                                   event.start_mark)
        parent.key = value
    elif parent.key is _MERGE_KEY:
        if not (isinstance(value, dict) or isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise ConstructorError("while constructing a mapping", parent.mark,
                                   "expected a mapping or list of mappings for merging", event.start_mark)
        parent.merges.append(value)
        parent.key = _NO_KEY
    else:
        if parent.key in parent.value:  # type: ignore[operator]
            raise ConstructorError("while constructing a mapping", parent.mark,
                                   f"found duplicate key {parent.key!r}", event.start_mark)
        parent.value[parent.key] = value
        parent.key = _NO_KEY


def _end(done: _Open, budget: list[int]) -> dict[Any, Any] | list[Any]:
    """The finished collection. A mapping with `<<` keys gets the merged keys first, in order;
    among merged mappings the first to have a key wins, and the mapping's own keys win over all
    (safe_load's result)."""
    value = done.value
    if done.merges:
        assert isinstance(value, dict)
        merged: dict[Any, Any] = {}
        for item in done.merges:
            for source in item if isinstance(item, list) else (item,):
                budget[0] -= len(source)
                if budget[0] < 0:
                    raise ConstructorError("while constructing a mapping", done.mark,
                                           f"merge keys copy more than {MAX_MERGED} entries in all", None)
                for key, val in source.items():
                    merged.setdefault(key, val)
        own = dict(value)
        value.clear()  # in place: an alias may already point at this mapping
        value.update(merged)
        value.update(own)
    return value
