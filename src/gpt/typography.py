"""The same words in another typography: quotes, dashes, emphasis marks and line wrapping.

A book from Project Gutenberg has curly quotes, em dashes, `_emphasis_` and lines wrapped near 70 columns;
another edition, a user's notes or a web page has straight quotes, `--`, no marks and other line lengths.
A model trained on one typography alone pays for every punctuation mark of another (0.59 bits/char on Alice's
validation split in plain ASCII, issue 25). Training copies written in other typographies teach it that these
are the same text: `typographic_variant` draws one, `ascii_typography` is the plain-ASCII rewrite used to
measure the gap (tests, benchmarks/typography.py).
"""

from __future__ import annotations

import random
import re
import textwrap
from dataclasses import dataclass

QUOTES = {"“": '"', "”": '"', "‘": "'", "’": "'"}
EMPHASIS = re.compile(r"_([^_\n]+(?:\n[^_\n]+)*)_")  # _a few words_, possibly over a line break
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class Typography:
    straight_quotes: bool = False
    dash: str = "—"  # what an em dash is written as
    emphasis: str | None = "_"  # the mark around emphasised words; None drops it
    wrap: int | None = None  # rewrap each paragraph at this many columns; None keeps the line breaks


ASCII = Typography(straight_quotes=True, dash="--", emphasis=None, wrap=66)


def retype(text: str, style: Typography) -> str:
    """`text` with its quotes, dashes, emphasis and wrapping in `style`; the words are left as they are."""
    if style.straight_quotes:
        text = text.translate(str.maketrans(QUOTES))
    text = text.replace("—", style.dash)
    if style.emphasis != "_":
        text = EMPHASIS.sub(lambda m: f"{style.emphasis or ''}{m.group(1)}{style.emphasis or ''}", text)
    if style.wrap:
        text = rewrap(text, style.wrap)
    return text


def rewrap(text: str, width: int) -> str:
    """Each paragraph (lines between blank lines) refilled at `width` columns. Paragraphs of short lines
    (headings) and with indented lines (tables of contents, verse) keep their breaks: refilling them would
    join what was apart."""
    paragraphs = PARAGRAPH_BREAK.split(text)
    breaks = PARAGRAPH_BREAK.findall(text)
    out = []
    for i, paragraph in enumerate(paragraphs):
        lines = paragraph.split("\n")
        prose = max(map(len, lines)) >= 50 and not any(line.startswith((" ", "\t")) for line in lines)
        trailing = paragraph[len(paragraph.rstrip()):]
        out.append(textwrap.fill(paragraph, width, break_on_hyphens=False, break_long_words=False) + trailing
                   if prose else paragraph)
        if i < len(breaks):
            out.append(breaks[i])
    return "".join(out)


def ascii_typography(text: str) -> str:
    """Plain ASCII typography: straight quotes, `--` for dashes, no emphasis marks, rewrapped at 66 columns."""
    return retype(text, ASCII)


def typographic_variant(text: str, rng: random.Random) -> str:
    """`text` in a typography drawn at random: each of quotes, dashes, emphasis and wrapping independently."""
    style = Typography(
        straight_quotes=rng.random() < 0.5,
        dash=rng.choice(["—", "--", " -- ", "-"]),
        emphasis=rng.choice(["_", None, "*"]),
        wrap=rng.choice([None, rng.randint(56, 80)]),
    )
    return retype(text, style)
