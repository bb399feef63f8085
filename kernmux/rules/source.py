"""Read a rule file into a YAML node tree with hard bounds, whatever the file holds.

A rule file may come from anywhere a process's environment points (``KERNMUX_RULES`` in
an inference worker), so reading it must never hang, exhaust memory or end in a
traceback. Every failure here is a :class:`RuleError` naming ``file:line``:

- only regular files are read (a FIFO, a directory, ``/dev/zero`` are refused from
  ``stat`` without reading), opened non-blocking, at most ``KERNMUX_RULES_MAX_BYTES``;
- the bytes must be UTF-8 text without control characters (binary and UTF-16 files are
  named as such, with the line of the first bad byte);
- composing the node tree is bounded: nodes written (one per :data:`BYTES_PER_NODE`
  bytes of the size limit), nesting depth (:data:`MAX_DEPTH`) and the nodes aliases may
  add when expanded (:data:`ALIAS_NODE_BUDGET` beyond the nodes written), so an alias
  bomb ("billion laughs") as a value, a mapping key or a ``<<`` merge is refused while
  its anchors are read, before anything is expanded;
- integer literals are at most :data:`MAX_INT_DIGITS` digits (``int()`` raises past 4,300).

Values are shown in messages through :func:`show`, which never renders more than a
short prefix of a value.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import stat
from collections.abc import Iterator

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

DEFAULT_MAX_BYTES = 4 * 1024 * 1024  # ~20,000 rules in block style
MAX_BYTES_ENV = "KERNMUX_RULES_MAX_BYTES"
# Deepest nesting a rule file needs is 7 (file > rules > rule > use > config > value, or a
# merge list); 32 leaves room and keeps the recursive composer far from Python's limit.
MAX_DEPTH = 32
# Nodes that aliases may add on expansion beyond the nodes written in the file (a file
# sharing a 'when' block among thousands of rules stays well within it).
ALIAS_NODE_BUDGET = 100_000
# Nodes a file may write: one per 8 bytes of the size limit (a 20,000-rule file in block
# style writes one per 10 bytes; a 4 MiB list of one-digit items would write 2 million,
# 600 MB of nodes).
BYTES_PER_NODE = 8
MIN_NODES = 10_000  # however small the size limit (a short file is denser than 1 per 8 bytes)
# Longest integer literal accepted (int() refuses more than 4,300 digits with a ValueError).
MAX_INT_DIGITS = 30
SHOW_LIMIT = 60
# YAML 1.1's printable set (what PyYAML's reader accepts), as a pattern of what it refuses.
_NOT_PRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_SURROGATE_OR_CONTROL = re.compile("[\ud800-\udfff\x00-\x08\x0b-\x1f\x7f-\x9f]")


class RuleError(ValueError):
    """A rule file is malformed. ``location`` is ``file:line``; ``more`` counts further
    problems found in the same file (``kernmux rules lint`` lists them all)."""

    def __init__(self, location: str, message: str, more: int = 0):
        self.location = location
        self.message = message
        self.more = more
        text = f"{location}: {message}"
        if more:
            text += f" (and {more} more problem{'s' if more > 1 else ''} in this file: kernmux rules lint lists them)"
        super().__init__(text)


def show(value: object, limit: int = SHOW_LIMIT) -> str:
    """A short, printable rendering of ``value`` for a message: never more than about
    ``limit`` characters of it, whatever its size (no repr of a whole container, no
    str() of a huge int, no lone surrogates)."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        text = repr(value)
    elif isinstance(value, int):
        digits = value.bit_length() * 0.30103
        text = repr(value) if digits < limit else f"an integer of about {int(digits) + 1} digits"
    elif isinstance(value, str):
        text = repr(value[:limit]) + (f"... ({len(value)} characters)" if len(value) > limit else "")
    elif isinstance(value, (bytes, bytearray)):
        text = f"{len(value)} bytes of binary data"
    elif isinstance(value, dict):
        text = f"a mapping of {len(value)} entries"
    elif isinstance(value, (list, tuple)):
        text = f"a list of {len(value)} items"
    elif isinstance(value, (set, frozenset)):
        text = f"a set of {len(value)} items"
    else:
        text = f"a {type(value).__name__}"
    return text.encode("ascii", "backslashreplace").decode("ascii")


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters, printable on any stream (ASCII escapes)."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("ascii", "backslashreplace").decode("ascii")


def max_bytes() -> int:
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    if not raw.isdigit() or int(raw) <= 0 or len(raw) > 15:
        raise RuleError(MAX_BYTES_ENV, f"expected a positive number of bytes, got {show(raw)}")
    return int(raw)


def line_of(data: bytes | str, offset: int) -> int:
    newline = b"\n" if isinstance(data, bytes) else "\n"
    return data.count(newline, 0, offset) + 1


# --------------------------------------------------------------------------- bytes


def read_bytes(path: str) -> bytes:
    """The file's bytes: a regular file of at most :func:`max_bytes` bytes, else RuleError."""
    limit = max_bytes()
    try:
        info = os.stat(path)
    except OSError as e:
        raise RuleError(f"{path}:0", f"cannot read rule file: {e.strerror or e}") from None
    _check_kind(path, info.st_mode)
    if info.st_size > limit:
        raise RuleError(f"{path}:1", f"rule file is {info.st_size} bytes; the limit is {limit} ({MAX_BYTES_ENV})")
    try:
        # O_NONBLOCK: should the path be swapped for a FIFO after stat, open() returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RuleError(f"{path}:0", f"cannot read rule file: {e.strerror or e}") from None
    try:
        _check_kind(path, os.fstat(fd).st_mode)
        chunks, size = [], 0
        while size <= limit:  # st_size can lie (/proc files, a file still growing)
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise RuleError(f"{path}:0", f"cannot read rule file: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise RuleError(f"{path}:1", f"rule file is larger than the limit of {limit} bytes ({MAX_BYTES_ENV})")
    return b"".join(chunks)


def _check_kind(path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = (
        "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
        else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
        else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
    )
    raise RuleError(f"{path}:0", f"rule file is {kind}; expected a regular file")


def decode(data: bytes, path: str) -> str:
    """UTF-8 text without control characters, else RuleError at the first bad byte's line."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(data) > 1 and (data[0] == 0) != (data[1] == 0)):
        raise RuleError(f"{path}:1", "rule file looks UTF-16 encoded; expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuleError(
            f"{path}:{line_of(data, e.start)}",
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); expected a UTF-8 YAML file",
        ) from None
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        raise RuleError(
            f"{path}:{line_of(text, bad.start())}",
            f"control character U+{ord(bad.group()):04X} at column {bad.start() - text.rfind(chr(10), 0, bad.start())}; "
            "expected printable YAML text (is this a binary file?)",
        )
    return text


# --------------------------------------------------------------------------- nodes


try:  # libyaml's parser when present (several times faster); the composer is always ours
    from yaml._yaml import CParser as _Parser

    def _init_parser(loader, text: str) -> None:
        _Parser.__init__(loader, text)

except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, _PyParser):  # type: ignore[no-redef]
        pass

    def _init_parser(loader, text: str) -> None:
        Reader.__init__(loader, text)
        Scanner.__init__(loader)
        _PyParser.__init__(loader)


class LimitError(yaml.MarkedYAMLError):
    """A bound of :func:`compose` was exceeded (not a syntax error)."""


class BoundedLoader(Composer, _Parser, SafeConstructor, Resolver):
    """SafeLoader semantics with a bounded composer (node count, depth, alias expansion)
    and bounded integer literals. Nodes keep only their start mark (the line a message
    names): a node costs about a third less memory."""

    def __init__(self, text: str, max_nodes: int):
        _init_parser(self, text)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        Composer.__init__(self)
        self.max_nodes = max_nodes
        self.depth = 0
        self.written = 0  # nodes written in the file
        self.alias_nodes = 0  # nodes aliases add when expanded
        self.sizes: dict[int, int] = {}  # id(anchored collection) -> its expanded size

    def compose_node(self, parent, index):
        event = self.get_event()
        kind = type(event)
        if kind is yaml.AliasEvent:
            node = self.anchors.get(event.anchor)
            if node is None:
                raise yaml.composer.ComposerError(None, None, f"found undefined alias {clip(event.anchor, 60)!r}", event.start_mark)
            self.alias_nodes += self.sizes.get(id(node), 1)
            budget = max(ALIAS_NODE_BUDGET, self.written)
            if self.alias_nodes > budget:
                raise LimitError(
                    None, None,
                    f"aliases expand to more than {budget} nodes (a YAML alias bomb?); the file writes "
                    f"{self.written}, and aliases may add at most as many (or {ALIAS_NODE_BUDGET})", event.start_mark,
                )
            return node
        self.written += 1
        if self.written > self.max_nodes:
            raise LimitError(
                None, None, f"more than {self.max_nodes} YAML nodes (one per {BYTES_PER_NODE} bytes of "
                f"{MAX_BYTES_ENV}, at least {MIN_NODES}); split the file or raise the limit", event.start_mark,
            )
        anchor = event.anchor
        if anchor is not None and anchor in self.anchors:
            raise yaml.composer.ComposerError(None, None, f"found duplicate anchor {clip(anchor, 60)!r}", event.start_mark)
        tag = event.tag
        if kind is yaml.ScalarEvent:
            if tag is None or tag == "!":
                tag = self.resolve(yaml.ScalarNode, event.value, event.implicit)
            node = yaml.ScalarNode(tag, event.value, event.start_mark, None, style=event.style)
            if anchor is not None:
                self.anchors[anchor] = node
            return node
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise LimitError(None, None, f"nesting deeper than {MAX_DEPTH} levels", event.start_mark)
        before = self.written + self.alias_nodes
        if kind is yaml.SequenceStartEvent:
            if tag is None or tag == "!":
                tag = self.resolve(yaml.SequenceNode, None, event.implicit)
            node = yaml.SequenceNode(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if anchor is not None:
                self.anchors[anchor] = node
            items = node.value
            while not self.check_event(yaml.SequenceEndEvent):
                items.append(self.compose_node(node, len(items)))
        else:
            if tag is None or tag == "!":
                tag = self.resolve(yaml.MappingNode, None, event.implicit)
            node = yaml.MappingNode(tag, [], event.start_mark, None, flow_style=event.flow_style)
            if anchor is not None:
                self.anchors[anchor] = node
            pairs = node.value
            while not self.check_event(yaml.MappingEndEvent):
                key = self.compose_node(node, None)
                pairs.append((key, self.compose_node(node, key)))
        self.get_event()  # the end event
        self.depth -= 1
        if anchor is not None:
            self.sizes[id(node)] = self.written + self.alias_nodes - before + 1
        return node

    def construct_yaml_int(self, node):
        digits = sum(ch.isalnum() for ch in node.value)
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"integer literal of {digits} digits; expected at most {MAX_INT_DIGITS}", node.start_mark
            )
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Composing builds many small objects and no cycles worth collecting: pausing the
    collector makes a 20,000-rule file compose about twice as fast."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compose(text: str, path: str) -> tuple[yaml.Node | None, BoundedLoader]:
    """The document's root node (None for an empty file) and the loader that made it
    (to construct values from its nodes; call ``loader.dispose()`` when done)."""
    loader = BoundedLoader(text, max_nodes=max(MIN_NODES, max_bytes() // BYTES_PER_NODE))
    try:
        with _no_gc():
            root = loader.get_single_node()
    except LimitError as e:
        loader.dispose()
        raise RuleError(f"{path}:{e.problem_mark.line + 1}", e.problem) from None
    except yaml.MarkedYAMLError as e:
        loader.dispose()
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise RuleError(f"{path}:{line}", f"YAML syntax error: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:  # ReaderError and friends: not marked
        loader.dispose()
        position = getattr(e, "position", None)
        line = line_of(text.encode("utf-8"), position) if isinstance(position, int) else 1
        raise RuleError(f"{path}:{line}", f"YAML error: {clip(str(e), 200)}") from None
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps the composer far from it
        loader.dispose()
        raise RuleError(f"{path}:1", f"nesting too deep; expected at most {MAX_DEPTH} levels") from None
    return root, loader


def _yaml_problem(e: yaml.MarkedYAMLError) -> str:
    parts = [p for p in (e.context, e.problem) if p]
    return clip("; ".join(parts) if parts else str(e), 200)


def safe_string(value: str) -> str | None:
    """Why a string from a rule file cannot be kept (a lone surrogate, which no output
    stream can encode, or a control character), or None when it is fine."""
    bad = _SURROGATE_OR_CONTROL.search(value)
    if bad is None:
        return None
    what = "a lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
    return f"{what} U+{ord(bad.group()):04X} at character {bad.start()}"
