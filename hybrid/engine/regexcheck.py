"""Refuse regexes that a crafted payload can make backtrack for a very long time.

Python's ``re`` is a backtracking matcher: when a pattern can split the same bytes between its
parts in many ways and then fails, it tries every split. ``(a+)+$`` on 30 ``a`` and one ``!``
tries about 2**30 of them; ``\\d*\\d*x`` on n digits tries n**2 at each start, n**3 for a search.
A ``payload_regex`` rule runs on every payload it applies to, so one such packet stalls the engine
and the queue behind it fails open for everyone. :func:`problem` reads the pattern's parse tree
(``re._parser``, Python 3.11) and names the first construct that can do this:

- **a repeat of a repeat** (star height 2) where one iteration of the outer repeat can end inside
  what the inner one could have taken: ``(a+)+``, ``(\\w+\\s?)*``, ``(.*a){12}``, ``(a|aa)*``
  (the alternation is a variable-length part like an inner repeat);
- **a repeat of an alternation** whose alternatives can match the same bytes: ``(ab|[ab]b)*``;
- **two wide repeats in a row** over bytes they share, with nothing between them that the first
  cannot take, followed by something that can fail: ``\\d*\\d*x``, ``x.*y.*z`` (polynomial).

Failure is what makes a matcher try the other splits, so a construct followed by nothing that
can fail is accepted: ``.*foo.*`` and ``(a+)+`` succeed the first time they get that far. A
possessive repeat (``a++``) or an atomic group (``(?>...)``) never gives bytes back, so what is
inside one is not a split that can be retried: that is the fix the messages suggest.

What is accepted is at most linear per start position: a single unbounded repeat such as
``a.*b`` scans the rest of the payload once from each ``a``, and no second repeat multiplies it.
A search tries every start, so the worst accepted case is quadratic in the bytes searched; the
engine bounds those per packet (rules.REGEX_WINDOW).

The check is a conservative reading of the tree, not a proof: it may refuse a pattern that is in
fact fast (say so in an issue), and the run-time window bounds what it misses.
"""

from __future__ import annotations

import re
from re import _constants as C
from re import _parser

__all__ = ["problem"]

_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT)
_INF = C.MAXREPEAT
_ALL = (1 << 256) - 1
WIDE = 8          # a repeat whose length can vary by this much (or more) counts as wide
_SHOW_MAX = 40    # characters of a sub-pattern quoted in a message


def _span(lo: int, hi: int) -> int:
    return ((1 << (hi - lo + 1)) - 1) << lo


def _bytes(text: bytes) -> int:
    mask = 0
    for b in text:
        mask |= 1 << b
    return mask


_DIGIT = _span(0x30, 0x39)
_SPACE = _bytes(b" \t\n\r\f\v")
_WORD = _DIGIT | _span(0x41, 0x5A) | _span(0x61, 0x7A) | 1 << 0x5F
_UPPER = _span(0x41, 0x5A)
_LOWER = _span(0x61, 0x7A)
_CATEGORY = {C.CATEGORY_DIGIT: _DIGIT, C.CATEGORY_NOT_DIGIT: _ALL & ~_DIGIT,
             C.CATEGORY_SPACE: _SPACE, C.CATEGORY_NOT_SPACE: _ALL & ~_SPACE,
             C.CATEGORY_WORD: _WORD, C.CATEGORY_NOT_WORD: _ALL & ~_WORD}


def _fold(mask: int, icase: bool) -> int:
    """Bytes patterns ignore case in ASCII only."""
    if icase:
        mask |= (mask & _UPPER) << 32 | (mask & _LOWER) >> 32
    return mask


class _Found(Exception):
    pass


# -- what a piece of pattern can match ------------------------------------------------------------
# `items` is a list of (op, av) as re._parser builds them; `ic` whether case is ignored there.

def _flags(av, ic: bool) -> bool:
    _group, add, delete, _p = av
    return bool((ic or add & re.IGNORECASE) and not delete & re.IGNORECASE)


def _in_set(av, ic: bool) -> int:
    mask, negate = 0, False
    for op, v in av:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            mask |= 1 << v
        elif op is C.RANGE:
            mask |= _span(v[0], min(v[1], 255))
        elif op is C.CATEGORY:
            mask |= _CATEGORY.get(v, _ALL)
        else:
            mask = _ALL
    mask = _fold(mask, ic)
    return _ALL & ~mask if negate else mask


def _chars(items, ic: bool) -> int:
    """Every byte the items can consume."""
    mask = 0
    for op, av in items:
        if op is C.LITERAL:
            mask |= _fold(1 << av, ic)
        elif op is C.NOT_LITERAL:
            mask |= _ALL & ~_fold(1 << av, ic)
        elif op is C.IN:
            mask |= _in_set(av, ic)
        elif op in _REPEATS:
            mask |= _chars(av[2], ic)
        elif op is C.SUBPATTERN:
            mask |= _chars(av[3], _flags(av, ic))
        elif op is C.ATOMIC_GROUP:
            mask |= _chars(av, ic)
        elif op is C.BRANCH:
            for branch in av[1]:
                mask |= _chars(branch, ic)
        elif op is C.GROUPREF_EXISTS:
            mask |= _chars(av[1], ic) | (_chars(av[2], ic) if av[2] else 0)
        elif op in (C.AT, C.ASSERT, C.ASSERT_NOT):
            pass                                # zero width
        else:                                   # ANY, a back-reference: anything
            mask = _ALL
    return mask


def _width(items) -> tuple[int, int]:
    lo = hi = 0
    for op, av in items:
        if op in (C.LITERAL, C.NOT_LITERAL, C.IN, C.ANY):
            a = b = 1
        elif op in _REPEATS:
            a, b = _width(av[2])
            a, b = a * av[0], (_INF if av[1] == _INF or b == _INF else b * av[1])
        elif op is C.SUBPATTERN:
            a, b = _width(av[3])
        elif op is C.ATOMIC_GROUP:
            a, b = _width(av)
        elif op is C.BRANCH:
            widths = [_width(branch) for branch in av[1]]
            a, b = min(w[0] for w in widths), max(w[1] for w in widths)
        elif op in (C.AT, C.ASSERT, C.ASSERT_NOT):
            a = b = 0
        else:
            a, b = 0, _INF
        lo, hi = lo + a, (_INF if _INF in (hi, b) else min(hi + b, _INF))
    return lo, hi


def _first(items, ic: bool) -> int:
    """The bytes a match of the items can start with."""
    mask = 0
    for i, item in enumerate(items):
        op, av = item
        if op in _REPEATS:
            mask |= _first(av[2], ic)
            if av[0] > 0 and _width(av[2])[0] > 0:
                return mask
        elif op is C.SUBPATTERN or op is C.ATOMIC_GROUP or op is C.BRANCH or op is C.GROUPREF_EXISTS:
            subs = {C.SUBPATTERN: lambda: [(av[3], _flags(av, ic))], C.ATOMIC_GROUP: lambda: [(av, ic)],
                    C.BRANCH: lambda: [(b, ic) for b in av[1]],
                    C.GROUPREF_EXISTS: lambda: [(av[1], ic), (av[2] or [], ic)]}[op]()
            mask |= 0 if not subs else _or(_first(s, c) for s, c in subs)
            if _width([item])[0] > 0:
                return mask
        elif op in (C.AT, C.ASSERT, C.ASSERT_NOT):
            continue
        else:
            return mask | _chars([item], ic)
    return mask


def _or(masks) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def _absorbable(items, allowed: int, ic: bool) -> bool:
    """Whether the items can match some byte string (the empty one too) made only of `allowed`
    bytes: a repeat over `allowed` placed before them could then have taken those bytes."""
    for op, av in items:
        if op is C.LITERAL or op is C.NOT_LITERAL or op is C.IN or op is C.ANY:
            if not _chars([(op, av)], ic) & allowed:
                return False
        elif op in _REPEATS:
            if av[0] > 0 and not _absorbable(av[2], allowed, ic):
                return False
        elif op is C.SUBPATTERN:
            if not _absorbable(av[3], allowed, _flags(av, ic)):
                return False
        elif op is C.ATOMIC_GROUP:
            if not _absorbable(av, allowed, ic):
                return False
        elif op is C.BRANCH:
            if not any(_absorbable(b, allowed, ic) for b in av[1]):
                return False
        elif op is C.GROUPREF_EXISTS:
            if not (_absorbable(av[1], allowed, ic) or _absorbable(av[2] or [], allowed, ic)):
                return False
    return True


def _can_fail(items) -> bool:
    """Whether the items can fail to match where they are tried (False when they can always
    match the empty string there: optional repeats, nothing at all)."""
    for op, av in items:
        if op in _REPEATS:
            if av[0] > 0 and _width(av[2])[0] > 0:
                return True
            if av[0] > 0 and _can_fail(av[2]):
                return True
        elif op is C.SUBPATTERN:
            if _can_fail(av[3]):
                return True
        elif op is C.ATOMIC_GROUP:
            if _can_fail(av):
                return True
        elif op is C.BRANCH:
            if all(_can_fail(b) for b in av[1]):
                return True
        else:
            return True                         # a byte, an anchor, a lookaround, a reference
    return False


# -- showing a piece of pattern in a message ------------------------------------------------------

_META = frozenset(b".^$*+?{}[]\\|()")
_AT = {C.AT_BEGINNING: "^", C.AT_END: "$", C.AT_BEGINNING_STRING: "\\A", C.AT_END_STRING: "\\Z",
       C.AT_BOUNDARY: "\\b", C.AT_NON_BOUNDARY: "\\B"}
_CAT = {C.CATEGORY_DIGIT: "\\d", C.CATEGORY_NOT_DIGIT: "\\D", C.CATEGORY_SPACE: "\\s",
        C.CATEGORY_NOT_SPACE: "\\S", C.CATEGORY_WORD: "\\w", C.CATEGORY_NOT_WORD: "\\W"}


def _byte(b: int, in_set: bool = False) -> str:
    if 0x20 < b < 0x7F:
        special = b"]\\^-" if in_set else _META
        return ("\\" if b in special else "") + chr(b)
    return {0x20: " ", 0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(b, f"\\x{b:02x}")


def _show(items) -> str:
    out = []
    for op, av in items:
        if op is C.LITERAL:
            out.append(_byte(av))
        elif op is C.NOT_LITERAL:
            out.append(f"[^{_byte(av, True)}]")
        elif op is C.ANY:
            out.append(".")
        elif op is C.IN:
            if len(av) == 1 and av[0][0] is C.CATEGORY:
                out.append(_CAT.get(av[0][1], "?"))
                continue
            parts = []
            for o, v in av:
                parts.append("^" if o is C.NEGATE else _byte(v, True) if o is C.LITERAL else
                             f"{_byte(v[0], True)}-{_byte(v[1], True)}" if o is C.RANGE else _CAT.get(v, "?"))
            out.append("[" + "".join(parts) + "]")
        elif op in _REPEATS:
            lo, hi, body = av
            inner = _show(body)
            if len(body) != 1 or body[0][0] in _REPEATS or (body[0][0] is C.LITERAL and len(inner) > 1
                                                             and not inner.startswith("\\")):
                inner = f"(?:{inner})"
            q = {(0, _INF): "*", (1, _INF): "+", (0, 1): "?"}.get((lo, hi))
            if q is None:
                q = f"{{{lo}}}" if lo == hi else f"{{{lo},}}" if hi == _INF else f"{{{lo},{hi}}}"
            out.append(inner + q + ("?" if op is C.MIN_REPEAT else "+" if op is C.POSSESSIVE_REPEAT else ""))
        elif op is C.SUBPATTERN:
            out.append(("(" if av[0] is not None else "(?:") + _show(av[3]) + ")")
        elif op is C.ATOMIC_GROUP:
            out.append("(?>" + _show(av) + ")")
        elif op is C.BRANCH:
            out.append("|".join(_show(b) for b in av[1]))
        elif op is C.AT:
            out.append(_AT.get(av, ""))
        elif op in (C.ASSERT, C.ASSERT_NOT):
            out.append("(?" + ("<" if av[0] < 0 else "") + ("=" if op is C.ASSERT else "!") + _show(av[1]) + ")")
        elif op is C.GROUPREF:
            out.append(f"\\{av}")
        else:
            out.append("(?(...)...)")
    return "".join(out)


def _quote(items) -> str:
    text = _show(items)
    return text if len(text) <= _SHOW_MAX else text[:_SHOW_MAX - 3] + "..."


# -- the three checks -----------------------------------------------------------------------------

def _variable_parts(items, ic: bool, rest: tuple = ()):
    """Each part of `items` whose length can vary (a repeat that is not possessive, an alternation
    of different lengths), with the chain of item lists that follow it up to the end of `items`.
    Atomic groups, possessive repeats and lookarounds commit: nothing inside them is yielded."""
    for i, (op, av) in enumerate(items):
        after = (items[i + 1:],) + rest
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi = _width([(op, av)])
            if hi > lo:
                yield (op, av), ic, after
            yield from _variable_parts(av[2], ic, after)
        elif op is C.SUBPATTERN:
            yield from _variable_parts(av[3], _flags(av, ic), after)
        elif op is C.BRANCH:
            widths = {_width(b) for b in av[1]}
            if len(widths) > 1:
                yield (op, av), ic, after
            for branch in av[1]:
                yield from _variable_parts(branch, ic, after)


def _variability(node) -> int:
    lo, hi = _width([node])
    return _INF if hi == _INF else hi - lo


def _simple_prefix(items, ic: bool) -> list[int]:
    """The byte sets of the single-byte items a branch starts with (up to the first other one)."""
    out = []
    for op, av in items:
        if op in (C.LITERAL, C.NOT_LITERAL, C.IN, C.ANY):
            out.append(_chars([(op, av)], ic))
        elif op is C.SUBPATTERN and not av[3]:
            continue
        else:
            break
    return out


def _distinct(a, b, ic: bool) -> bool:
    """Whether two alternatives can never match the same bytes (judged on their leading bytes)."""
    (alo, ahi), (blo, bhi) = _width(a), _width(b)
    if ahi < blo or bhi < alo:
        return True                             # different lengths: the loop check's business
    return any(not x & y for x, y in zip(_simple_prefix(a, ic), _simple_prefix(b, ic)))


def _branches(items, ic: bool):
    """The alternations inside `items` that backtracking can revisit (not inside a commit)."""
    for op, av in items:
        if op is C.BRANCH:
            yield av[1], ic
            for b in av[1]:
                yield from _branches(b, ic)
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            yield from _branches(av[2], ic)
        elif op is C.SUBPATTERN:
            yield from _branches(av[3], _flags(av, ic))


def _check_loop(node, ic: bool) -> None:
    """Star height 2 and repeated ambiguous alternations (exponential when unbounded)."""
    op, (lo, hi, body) = node
    loop = _quote([node])
    starts = _first(body, ic)
    many = hi == _INF or hi >= WIDE
    growth = "exponential" if hi == _INF else f"polynomial (degree up to {hi})"
    for part, pic, after in _variable_parts(body, ic):
        inner = _chars([part], pic)
        if not inner & starts or not all(_absorbable(r, inner, ic) for r in after):
            continue
        if not (many or _variability(part) >= WIDE):
            continue
        if part[0] is C.BRANCH:
            raise _Found(f"can take {growth} time on a crafted payload: in {loop} the alternatives "
                         f"{_quote([part])} have different lengths and the next repetition can start with "
                         f"what the longer one takes, so the same bytes split in many ways; make the group "
                         f"atomic, (?>...), or the repeat possessive ({_quote(body)})*+")
        fixed = _quote([(C.POSSESSIVE_REPEAT, part[1])])
        raise _Found(f"can take {growth} time on a crafted payload: in {loop} the inner repeat "
                     f"{_quote([part])} and the outer one can split the same bytes in many ways; make the "
                     f"inner repeat possessive: {fixed} (or (?>...)), or make each repetition end on a byte "
                     f"the inner repeat cannot take")
    if not many:
        return
    for branches, bic in _branches(body, ic):
        for i, a in enumerate(branches):
            for b in branches[i + 1:]:
                if not _distinct(a, b, bic):
                    raise _Found(f"can take exponential time on a crafted payload: in {loop} the alternatives "
                                 f"{_quote(a) or '(empty)'} and {_quote(b) or '(empty)'} can match the same "
                                 f"bytes, so each repetition can be tried both ways; make them start "
                                 f"differently, or make the group atomic: (?>{_quote(a)}|{_quote(b)})")


def _flatten(items, ic: bool) -> list[tuple]:
    """The items with plain groups opened: one sequence, each item with its own case flag."""
    out = []
    for op, av in items:
        if op is C.SUBPATTERN:
            out.extend(_flatten(av[3], _flags(av, ic)))
        else:
            out.append((op, av, ic))
    return out


def _check_chain(items, ic: bool, tail_fails: bool) -> None:
    """Two wide repeats in a row over shared bytes, then something that can fail (polynomial)."""
    flat = _flatten(items, ic)
    alive: list[tuple] = []      # wide repeats that could still take every byte seen since them
    for j, (op, av, ric) in enumerate(flat):
        if op in _REPEATS and _variability((op, av)) >= WIDE:
            mine = _chars(av[2], ric)
            fails = tail_fails or _can_fail([(o, a) for o, a, _ in flat[j + 1:]])
            for first, _theirs in alive:
                # it costs when this repeat can take what the first gives back: a repetition of it
                if fails and _absorbable(first[1][2], mine, ric):
                    node = (op, av)
                    raise _Found(f"can take polynomial time on a crafted payload: {_quote([first])} and "
                                 f"{_quote([node])} can take the same bytes with nothing between them that "
                                 f"the first cannot take, so every split is tried before a failure; make "
                                 f"the first possessive ({_quote([(C.POSSESSIVE_REPEAT, first[1])])}), "
                                 f"or put a byte neither can match between them")
        alive = [(node, theirs) for node, theirs in alive if _absorbable([(op, av)], theirs, ric)]
        if op in (C.MAX_REPEAT, C.MIN_REPEAT) and _variability((op, av)) >= WIDE:
            alive.append(((op, av), _chars(av[2], ric)))


def _walk(items, ic: bool, tail_fails: bool) -> None:
    """Check every sequence in the tree. `tail_fails`: whether what follows `items` can fail."""
    items = list(items)
    _check_chain(items, ic, tail_fails)
    for i, (op, av) in enumerate(items):
        after_fails = tail_fails or _can_fail(items[i + 1:])
        if op in _REPEATS:
            lo, hi, body = av
            if op is not C.POSSESSIVE_REPEAT and hi >= 2 and (after_fails or lo >= 2):
                _check_loop((op, av), ic)
            # inside a possessive repeat one repetition is committed once matched
            _walk(body, ic, op is not C.POSSESSIVE_REPEAT)
        elif op is C.SUBPATTERN:
            _walk(av[3], _flags(av, ic), after_fails)
        elif op is C.ATOMIC_GROUP:
            _walk(av, ic, False)                # committed: what follows never backtracks into it
        elif op is C.BRANCH:
            for branch in av[1]:
                _walk(branch, ic, after_fails)
        elif op in (C.ASSERT, C.ASSERT_NOT):
            _walk(av[1], ic, False)             # lookarounds are atomic in re
        elif op is C.GROUPREF_EXISTS:
            _walk(av[1], ic, after_fails)
            if av[2]:
                _walk(av[2], ic, after_fails)


def problem(pattern: str | bytes, flags: int = 0) -> str | None:
    """Why `pattern` can backtrack super-linearly, and how to fix it (a phrase that follows the
    pattern in a message, starting "can take ... time"), or ``None`` when it cannot. The pattern
    must compile (``re.error`` otherwise)."""
    tree = _parser.parse(pattern, flags)
    ic = bool(tree.state.flags & re.IGNORECASE)
    try:
        _walk(tree.data, ic, False)
    except _Found as found:
        return str(found)
    return None
