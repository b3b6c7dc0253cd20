"""The one front-end for the TOML files hybrid reads: rules files (hybrid/engine/rules.py) and
the service configuration (hybrid/service/config.py).

Reading a file gives a :class:`TomlSource`: the parsed document and the text it came from, so
that every later complaint about a value can name the line that value is on. Every error is a
:class:`TomlFileError` (a ConfigError) whose ``str()`` is one line, ``FILE:LINE: message``.

A *place* in a file is one of

- ``None``: the top level, before the first table header;
- ``"attach"``: a table, written as an ``[attach]`` header or as dotted keys ``attach.mark = 1``;
- ``("rule", 3)``: the fourth entry of an array of tables, the fourth ``[[rule]]`` header.

:meth:`TomlSource.line` finds a key in a place: ``key = ...``, ``"key" = ...``, a dotted
``key.sub = ...`` or a sub-table header ``[place.key]``; when the key is not written anywhere it
can be found, the place's own header stands for it.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass

from hybrid.errors import ConfigError

Place = None | str | tuple[str, int]

_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END_RE = re.compile(r"\s*\(at end of document\)$")
# A table header, "[name]" or "[[name]]", with nothing but a comment after it. The name allows
# what hybrid's files use (bare and quoted keys, dots); an inline array value such as
# "[1, 2]," is not a header.
_HEADER_RE = re.compile(r"""^\s*(\[\[?)\s*([A-Za-z0-9_\-"'. ]+?)\s*\]\]?\s*(?:#.*)?$""")


class TomlFileError(ConfigError):
    """A file that cannot be used; ``str()`` is ``FILE:LINE: message`` (``FILE: message`` when
    no line applies). ``reason`` is the message alone."""

    def __init__(self, filename: str, line: int | None, message: str):
        where = f"{filename}:{line}" if line else filename
        super().__init__(f"{where}: {message}")
        self.filename = filename
        self.line = line
        self.reason = message


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` was probably meant to be: one with the same letters (two swapped)
    first, else the closest spelling; None when nothing is close."""
    choices = list(choices)
    swapped = [c for c in choices if sorted(c) == sorted(word)]
    close = swapped or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: str, choices: Iterable[str]) -> str:
    """``did you mean 'x'?``, or the list of valid keys when nothing is close."""
    choices = list(choices)
    close = close_match(word, choices)
    return f"did you mean {close!r}?" if close else f"valid keys: {', '.join(choices)}"


def _key_re(path: tuple[str, ...]) -> re.Pattern:
    """A line that assigns ``path`` (``a.b = ...``) or a key below it (``a.b.c = ...``); every
    part may be quoted."""
    parts = [r"""(?:%s|"%s"|'%s')""" % ((re.escape(p),) * 3) for p in path]
    return re.compile(r"^\s*" + r"\s*\.\s*".join(parts) + r"\s*[=.]")


def _header_name(text: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in text.split("."))


class TomlSource:
    """A parsed TOML file and its text: ``doc`` is what tomllib made of it; :meth:`line` and
    :meth:`error` locate keys for messages."""

    def __init__(self, filename: str, text: str, doc: dict, error: type[TomlFileError] = TomlFileError):
        self.filename = filename
        self.text = text
        self.doc = doc
        self.error_class = error
        self.lines = text.splitlines()
        self._headers: list[tuple[int, str]] = []          # (0-based line, name), in file order
        self._tables: dict[str, int] = {}                   # [name] -> its first header's line
        self._arrays: dict[str, list[int]] = {}             # [[name]] -> each entry's header line
        for i, ln in enumerate(self.lines):
            m = _HEADER_RE.match(ln)
            if not m:
                continue
            name = _header_name(m.group(2))
            self._headers.append((i, name))
            if m.group(1) == "[[":
                self._arrays.setdefault(name, []).append(i)
            else:
                self._tables.setdefault(name, i)

    def _span(self, place: Place) -> tuple[int, int, int | None]:
        """(first line, end line, header line or None) of ``place``, 0-based; a place without a
        header spans nothing."""
        if place is None:
            return 0, (self._headers[0][0] if self._headers else len(self.lines)), None
        if isinstance(place, tuple):
            name, index = place
            entries = self._arrays.get(name, [])
            header = entries[index] if 0 <= index < len(entries) else None
        else:
            name, header = place, self._tables.get(place)
        if header is None:
            return 0, 0, None
        # it ends at the next header that is not one of its own sub-tables ([[rule]] ends at the
        # next [[rule]], [attach] at [engine]; [rule.rewrite] stays inside its [[rule]])
        end = next((i for i, n in self._headers if i > header and not n.startswith(name + ".")), len(self.lines))
        return header, end, header

    def _find(self, start: int, end: int, path: tuple[str, ...]) -> int | None:
        pat = _key_re(path)
        return next((i for i in range(start, end) if pat.match(self.lines[i])), None)

    def line(self, place: Place = None, key: str | None = None) -> int | None:
        """1-based line of ``key`` in ``place``, else of the place's header (the top level: line
        1); None when the place is not written in the file."""
        start, end, header = self._span(place)
        if key is not None:
            found = self._find(start, end, (key,))
            if found is None and isinstance(place, str):      # dotted at the top level: attach.mark = 1
                top_start, top_end, _ = self._span(None)
                found = self._find(top_start, top_end, (place, key))
            if found is None:                                  # a sub-table: [attach.key], [rule.key]
                name = key if place is None else f"{place if isinstance(place, str) else place[0]}.{key}"
                inside = isinstance(place, tuple)              # an entry's sub-table is inside the entry
                found = next((i for i, n in self._headers if n == name and (not inside or start <= i < end)), None)
            if found is not None:
                return found + 1
        if place is None:
            return 1 if self.lines else None
        return None if header is None else header + 1

    def error(self, place: Place, key: str | None, message: str) -> TomlFileError:
        """The ``FILE:LINE: message`` error for ``key`` in ``place`` (to raise)."""
        return self.error_class(self.filename, self.line(place, key), message)


@dataclass(frozen=True)
class TomlFormat:
    """One kind of file hybrid reads: its error class and how messages name it."""

    error: type[TomlFileError]
    what: str                     # "the rules file": "cannot read the rules file: ..."
    headers: str                  # the header the syntax hint shows: "[[rule]] headers"
    missing_hint: str = ""        # added when the file does not exist: where to get one

    def read(self, path: str | os.PathLike) -> TomlSource:
        """Read, decode and parse the file at ``path``."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            hint = self.missing_hint if exc.errno == errno.ENOENT else ""
            raise self.error(path, None, f"cannot read {self.what}: {exc.strerror}{hint}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise self.error(path, line, "not UTF-8 text; save the file as UTF-8") from None
        return self.parse(text, path)

    def parse(self, text: str, filename: str) -> TomlSource:
        """Parse ``text``; ``filename`` names it in errors."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise self._syntax_error(filename, text, exc) from None
        return TomlSource(filename, text, doc, self.error)

    def _syntax_error(self, filename: str, text: str, exc: tomllib.TOMLDecodeError) -> TomlFileError:
        """tomllib's message, its "(at line L, column C)" turned into FILE:L and a hint."""
        msg, line = str(exc), None
        m = _TOML_POS_RE.search(msg)
        if m:
            line, msg = int(m.group(1)), msg[:m.start()] + f" at column {m.group(2)}"
        else:
            m = _TOML_END_RE.search(msg)
            if m:
                line, msg = max(1, len(text.splitlines())), msg[:m.start()] + " at the end of the file"
        hint = f"check the TOML syntax (strings in quotes, one key = value per line, {self.headers})"
        if msg.startswith(("Cannot overwrite a value", "Cannot declare")):
            hint = "a key or table is given twice; keep one"
        return self.error(filename, line, f"TOML syntax: {msg[0].lower() + msg[1:]}; {hint}")
