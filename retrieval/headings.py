"""Split a document's text into sections under their headings, keeping character offsets.

Two heading syntaxes are recognised:

  markdown    ATX headings (`# Title`, `## Sub`, up to six levels; a closing run of #
              is dropped) and setext headings (a line underlined with === for level 1 or
              --- for level 2). Lines inside ``` or ~~~ code fences are never headings.
  underlined  reStructuredText-style headings, as in plain text files and the CPython
              language reference (`pydoc_data.topics`): a title line followed by a line
              of one repeated character from  = - ~ * ^ # + " `  at least as long as the
              title (and at least 3 long), optionally with the same line above it. As in
              reStructuredText, levels follow the order in which underline styles first
              appear: the first style seen is level 1, the next new one level 2, ...

A section runs from the start of its heading line to the start of the next heading line
(or the end of the text), so the heading text is part of its section and sections tile
the whole text without gaps. Text before the first heading is a section with no heading.
"""

from __future__ import annotations

import dataclasses
import re

from compress.errors import InputError

_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*$")
_UNDERLINE_CHARS = "=-~*^#+\"`"
STYLES = ("markdown", "underlined", "none")


@dataclasses.dataclass(frozen=True)
class Section:
    """Characters [start, end) of a text, under the heading path `headings` (outermost first)."""

    start: int
    end: int
    headings: tuple[str, ...]  # () before the first heading

    @property
    def heading(self) -> str | None:
        """The heading path joined with ' > ', or None before the first heading."""
        return " > ".join(self.headings) if self.headings else None


def _lines(text: str) -> list[tuple[int, str]]:
    """(start offset, line without its line break) for every line of `text`."""
    out, start = [], 0
    for line in text.splitlines(keepends=True):
        out.append((start, line.rstrip("\r\n")))
        start += len(line)
    return out


def _markdown_headings(lines: list[tuple[int, str]]) -> list[tuple[int, int, str]]:
    """(offset of the heading's first line, level, title) of each Markdown heading."""
    found, fence = [], None
    for i, (offset, line) in enumerate(lines):
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1) == fence:
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        atx = _ATX.match(line)
        if atx:
            found.append((offset, len(atx.group(1)), (atx.group(2) or "").strip()))
            continue
        setext = _SETEXT.match(line)
        if setext and i > 0:
            prev_offset, prev = lines[i - 1]
            # The underlined line must be paragraph text, not blank, not itself a heading.
            if prev.strip() and not _ATX.match(prev) and not _SETEXT.match(prev) and not (
                found and found[-1][0] == prev_offset
            ):
                found.append((prev_offset, 1 if setext.group(1)[0] == "=" else 2, prev.strip()))
    return found


def _is_rule(line: str) -> bool:
    s = line.rstrip()
    return len(s) >= 3 and s[0] in _UNDERLINE_CHARS and s == s[0] * len(s)


def _underlined_headings(lines: list[tuple[int, str]]) -> list[tuple[int, int, str]]:
    """(offset of the heading's first line, level, title) of each underlined heading."""
    found, levels = [], {}
    i = 1
    while i < len(lines):
        offset, title = lines[i - 1]
        rule = lines[i][1].rstrip()
        if _is_rule(rule) and title.strip() and not _is_rule(title) and len(rule) >= len(title.rstrip()):
            overlined = i >= 2 and lines[i - 2][1].rstrip() == rule
            style = (rule[0], overlined)
            levels.setdefault(style, len(levels) + 1)
            found.append((lines[i - 2][0] if overlined else offset, levels[style], title.strip()))
            i += 2
            continue
        i += 1
    return found


def sections(text: str, style: str) -> list[Section]:
    """The sections of `text` in order; they tile [0, len(text)).

    Args:
      text: the whole document.
      style: 'markdown', 'underlined' (reStructuredText-like plain text) or 'none'.
    Returns:
      Sections with their heading paths; a text without headings is one section.
    """
    if style not in STYLES:
        raise InputError(f"heading style {style!r}; choose one of {', '.join(STYLES)}")
    lines = _lines(text)
    found = {"markdown": _markdown_headings, "underlined": _underlined_headings}.get(style, lambda _: [])(lines)
    out, path = [], []  # path: [(level, title)] of the headings enclosing the current point
    starts = [0] + [offset for offset, _, _ in found]
    heads: list[tuple[str, ...]] = [()]
    for _, level, title in found:
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        heads.append(tuple(t for _, t in path))
    ends = starts[1:] + [len(text)]
    for start, end, headings in zip(starts, ends, heads):
        if end > start:
            out.append(Section(start, end, headings))
    return out or [Section(0, len(text), ())]
