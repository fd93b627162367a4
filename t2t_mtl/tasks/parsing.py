"""Generated text -> structured prediction, and the canonical NER linearisation.

Six parse kinds, named by a template's `parse:` key:

- `label`: the answer choice the text names. Tolerant: first non-empty line, case and punctuation
  ignored (`Sci-Tech.` names `Sci/Tech`, `Not entailment` names `not_entailment`), then a unique
  choice the text starts with, then a unique choice it contains as whole words. `value` is the choice
  as spelled in `answer_choices`, or None (invalid) when no choice or more than one is named.
- `labels`: several answer choices at once (multi-label classification): the first non-empty line
  split at `,`, `;` or `|`, each item read as `label` reads one; `value` is the named choices in
  `answer_choices` order without repeats, `[]` for the word `none`. Invalid (the items it could
  read are kept, for partial credit) when an item names no choice or the line is empty. Canonical
  form (`labels_linearize`): the choices in `answer_choices` order joined by `, `, or `none`.
- `span`: the answer text of extractive QA: first non-empty line, stripped, without an `Answer:` prefix
  or wrapping quotes. Invalid when empty.
- `text`: free text (summaries), stripped. Invalid when empty.
- `number`: a real number (a regression target such as a 1-5 similarity score): the first number
  on the first non-empty line (`4.2`, `-1`, `.5`, `3,5` with a decimal comma, `1,000` with a
  thousands comma, `1e-3`; an `Answer:` prefix and a trailing unit or `/5` are ignored); `value` is a
  float. Invalid when the line holds
  no number.
- `entities`: NER output in the canonical linearisation below, aligned back to the sentence's tokens;
  `value` is the list of BIO tags (one per token, what span F1 scores) and `detail` the recovered
  `(type, text)` entities.

Canonical NER linearisation (`ner_linearize`): the entities in sentence order, each as `TYPE: tokens`
(tokens joined by single spaces), separated by ` | `; a sentence without entities is the word `none`.
Entity types are data: a task's types come from its template (`entity_types`, else the `B-x`/`I-x`
tags of its label map; `Task.entity_types`). A type name may hold any characters (case, hyphens,
spaces, digits, dots: `creative-work`, `Product Name`, `LOC2`) except `:`, `|`, `;`, line breaks and
leading, trailing or repeated whitespace (`type_name_problem`): those would make the linearisation
ambiguous. `ner_parse` reads a type case-insensitively and through the task's aliases (other
spellings, e.g. CoNLL's `PERSON` for `PER`); an alias or a case change is accepted but not canonical.
`Peter Blackburn visited New York .` tagged B-PER I-PER O B-LOC I-LOC O ->
`PER: Peter Blackburn | LOC: New York`. `ner_parse` aligns each entity left to right, so linearise ->
parse gives back the input tags exactly for IOB2 input (it is checked on every row of the real
CoNLL-2003 slice). The one case the format cannot express is an entity whose text also occurs untagged
earlier in the sentence (after the previous entity): alignment picks the earlier occurrence.

Nothing here raises on model output: malformed text yields what can be recovered with `valid=False`.
Caller mistakes (unknown kind, missing answer choices or tokens) raise ValueError.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ENTITY_SEP",
    "ENTITY_TYPES",
    "KINDS",
    "LABEL_KINDS",
    "OUTSIDE",
    "NO_ENTITIES",
    "Parsed",
    "ner_linearize",
    "ner_parse",
    "parse",
    "labels_linearize",
    "parse_label",
    "parse_labels",
    "parse_number",
    "parse_span",
    "split_tag_map",
    "tag_type",
    "tags_to_spans",
    "type_name_problem",
]

NO_ENTITIES = "none"  # the whole output for a sentence without entities
ENTITY_SEP = " | "
OUTSIDE = "O"  # the tag of a token outside every entity
ENTITY_TYPES = ("PER", "ORG", "LOC", "MISC")  # CoNLL-2003: `ner_parse`'s default types
# Spellings models produce for the CoNLL types; accepted, but the output is then not canonical
# (valid=False). `ner_parse`'s default aliases when its types are exactly the CoNLL four (templates
# copied into run folders before `entity_types` existed); the shipped template declares them itself.
TYPE_ALIASES = {
    "PERSON": "PER",
    "PERS": "PER",
    "ORGANIZATION": "ORG",
    "ORGANISATION": "ORG",
    "LOCATION": "LOC",
    "GPE": "LOC",
    "MISCELLANEOUS": "MISC",
}
KINDS = ("label", "labels", "span", "text", "entities", "number")
# Kinds whose parser reads only the first non-empty line: once that line has ended, later text
# cannot change the prediction (evaluation stops generating there).
FIRST_LINE_KINDS = ("label", "labels", "span", "number")
LABELS_SEPARATORS = (",", ";", "|")  # between the choices of a `labels` answer
# Kinds whose answers are made of a template's answer_choices (a label task's)
LABEL_KINDS = ("label", "labels")
# Kinds whose answers have a form that decoding can be held to (`eval_mode: constrained`,
# tasks/constraints.py); free text and numbers have none.
CONSTRAINED_KINDS = ("label", "span", "entities")

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_TYPE_FORBIDDEN = (":", "|", ";", "\n", "\r")  # the linearisation's own separators
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?answer\s*(?:is\s*)?[:\-]\s*", re.I)
_QUOTES = ('""', "''", "``", "“”", "‘’", "**", "`")
# a decimal number: sign, digits with a decimal point or comma, exponent (`-3`, `4.25`, `.5`, `3,5`)
# (a comma before exactly three digits groups thousands: `1,000` is 1000, `3,5` is 3.5)
_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:[.,]\d+)?|[.,]\d+)(?:[eE][-+]?\d+)?"
)


@dataclass(frozen=True)
class Parsed:
    """A parsed model output: `value` (None when nothing usable), `valid` (output had the expected form).

    `detail` carries extra structure for some kinds: the `(type, text)` entity list for `entities`.
    """

    value: str | float | list[str] | None  # label/span/text: the text; number: a float;
    # entities: one BIO tag per token; labels: the choices named
    valid: bool
    detail: list[tuple[str, str]] | None = None


def parse(
    kind: str,
    text: str | None,
    *,
    answer_choices: Sequence[str] | None = None,
    tokens: Sequence[str] | None = None,
    entity_types: Sequence[str] | None = ENTITY_TYPES,
    entity_aliases: Mapping[str, str] | None = None,
) -> Parsed:
    """Parse generated `text` as `kind` (label | labels | span | text | entities | number); see the
    module docstring.

    `entity_types` / `entity_aliases`: the task's entity types and other spellings (alias -> type)
    for `entities`, as `ner_parse` takes them.
    """
    text = "" if text is None else str(text)
    if kind == "label":
        if not answer_choices:
            raise ValueError("parse('label') needs answer_choices")
        value = parse_label(text, answer_choices)
        return Parsed(value, value is not None)
    if kind == "labels":
        if not answer_choices:
            raise ValueError("parse('labels') needs answer_choices")
        chosen, ok = parse_labels(text, answer_choices)
        return Parsed(chosen, ok)
    if kind == "span":
        value = parse_span(text)
        return Parsed(value, bool(value))
    if kind == "text":
        value = text.strip()
        return Parsed(value, bool(value))
    if kind == "number":
        number = parse_number(text)
        return Parsed(number, number is not None)
    if kind == "entities":
        if tokens is None:
            raise ValueError("parse('entities') needs the sentence's tokens")
        entities, tags, valid = ner_parse(text, tokens, entity_types, entity_aliases)
        return Parsed(tags, valid, entities)
    raise ValueError(f"unknown parse kind {kind!r}; expected one of {', '.join(KINDS)}")


# ---------------------------------------------------------------- label


def _words(s: str) -> tuple[str, ...]:
    """Case-folded alphanumeric words: 'Sci/Tech' -> ('sci', 'tech'), 'not_entailment' -> ('not', 'entailment')."""
    return tuple(w for w in _NON_ALNUM.split(s.casefold()) if w)


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _unique_longest(cands: list[tuple[int, int, str]]) -> str | None:
    """Among (start, end, choice) matches, drop those inside a longer match; one choice left -> it."""
    kept = {
        c
        for s, e, c in cands
        if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, c2 in cands if c2 != c)
    }
    return kept.pop() if len(kept) == 1 else None


def parse_label(text: str, answer_choices: Sequence[str]) -> str | None:
    """The answer choice `text` names (see module docstring): the first line equal to a choice,
    else the longest choice it starts with (its first answer: "2 stars or 3 stars" -> "2 stars"),
    else the one choice it contains; None when it names none, or several without starting with one."""
    line = _first_line(text)
    if not line:
        return None
    choices = list(answer_choices)
    folded = line.casefold().rstrip(".!?,;: \t")
    for c in choices:  # exact match (ignoring case and trailing punctuation) first
        if folded == c.casefold():
            return c
    out = _words(line)
    if not out:
        return None
    cw = {c: _words(c) for c in choices if _words(c)}
    exact = [c for c, w in cw.items() if w == out]
    if len(exact) == 1:
        return exact[0]
    starts = [(0, len(w), c) for c, w in cw.items() if out[: len(w)] == w]
    if starts:
        return _unique_longest(starts)
    contains = [
        (i, i + len(w), c)
        for c, w in cw.items()
        for i in range(len(out) - len(w) + 1)
        if out[i : i + len(w)] == w
    ]
    return _unique_longest(contains) if contains else None


def parse_labels(text: str, answer_choices: Sequence[str]) -> tuple[list[str], bool]:
    """(the choices the first line names, in `answer_choices` order; whether every item named one):
    see the module docstring. `none` (any case, trailing punctuation) names no choice, validly."""
    line = _first_line(text)
    if not line:
        return [], False
    if line.casefold().rstrip(".!?,;: \t") == NO_ENTITIES:
        return [], True
    named, ok = set(), True
    for item in re.split("|".join(map(re.escape, LABELS_SEPARATORS)), line):
        if not item.strip():
            continue  # "a, b," : a trailing separator
        choice = parse_label(item, answer_choices)
        if choice is None:
            ok = False
        else:
            named.add(choice)
    return [c for c in answer_choices if c in named], ok and bool(named)


def labels_linearize(labels: Sequence[str], answer_choices: Sequence[str]) -> str:
    """The canonical `labels` answer: the choices in `answer_choices` order joined by `, `, or `none`."""
    chosen = set(labels)
    return ", ".join(c for c in answer_choices if c in chosen) or NO_ENTITIES


# ---------------------------------------------------------------- span


def parse_span(text: str) -> str:
    """Extractive answer: first non-empty line, without an 'Answer:' prefix or wrapping quotes."""
    line = _ANSWER_PREFIX.sub("", _first_line(text), count=1).strip()
    for pair in _QUOTES:
        o, c = (pair[0], pair[1]) if len(pair) == 2 else (pair, pair)
        if len(line) >= 2 and line.startswith(o) and line.endswith(c):
            line = line[1:-1].strip()
    return line


# ---------------------------------------------------------------- number


def parse_number(text: str) -> float | None:
    """The first number on the first non-empty line of `text` (see module docstring), else None."""
    line = _ANSWER_PREFIX.sub("", _first_line(text), count=1)
    m = _NUMBER.search(line)
    if m is None:
        return None
    digits = m.group(0).replace("−", "-")
    digits = (
        digits.replace(",", "") if re.search(r",\d{3}(?!\d)", digits) else digits.replace(",", ".")
    )
    value = float(digits)
    return value if value == value and abs(value) != float("inf") else None


# ---------------------------------------------------------------- entities


def type_name_problem(name: object) -> str:
    """Why `name` cannot be an entity type name ("" when it can): it must be non-empty text without
    `:`, `|`, `;` or line breaks (the linearisation's separators), with single inner spaces and no
    leading or trailing whitespace (outputs are compared with their whitespace normalised)."""
    if not isinstance(name, str) or not name:
        return "a type name must be non-empty text"
    bad = [c for c in _TYPE_FORBIDDEN if c in name]
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"it contains {shown}, which the `TYPE: words | TYPE: words` format uses itself"
    if " ".join(name.split()) != name:
        return "it has leading, trailing, repeated or non-space whitespace"
    return ""


def tag_type(tag: object) -> str | None:
    """The entity type of a `B-x` / `I-x` tag (`x`), else None (`O` and anything else)."""
    if isinstance(tag, str) and len(tag) > 2 and tag[:2] in ("B-", "I-"):
        return tag[2:]
    return None


def split_tag_map(
    labels: Mapping[str, str], types: Sequence[str] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """A tag list's label map as (whole-value map, type renames).

    A value that is a tag (`O`, or `B-x`/`I-x` with `x` one of `types`, any `x` when `types` is
    None) maps a whole raw value (`"1": B-person`); any other value renames a type (`PER: person`
    turns `B-PER`/`I-PER` into `B-person`/`I-person`). Values are never mapped twice.
    """
    whole: dict[str, str] = {}
    renames: dict[str, str] = {}
    for raw, value in labels.items():
        t = tag_type(value)
        if value == OUTSIDE or (t is not None and (types is None or t in types)):
            whole[raw] = value
        else:
            renames[raw] = value
    return whole, renames


def tags_to_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans `(type, start, end)` (end exclusive) of a BIO tag sequence.

    A stray `I-X` (not after B-X/I-X) starts a new entity, as conlleval does.
    """
    spans: list[tuple[str, int, int]] = []
    i, n = 0, len(tags)
    while i < n:
        tag = tags[i]
        if tag == "O" or len(tag) < 3 or tag[1] != "-":
            i += 1
            continue
        etype, j = tag[2:], i + 1
        while j < n and tags[j] == f"I-{etype}":
            j += 1
        spans.append((etype, i, j))
        i = j
    return spans


def ner_linearize(tokens: Sequence[str], tags: Sequence[str]) -> str:
    """Canonical entity string, e.g. `PER: Peter Blackburn | LOC: New York`; `none` without entities."""
    if len(tokens) != len(tags):
        raise ValueError(f"{len(tokens)} tokens but {len(tags)} tags")
    parts = [f"{etype}: {' '.join(tokens[s:e])}" for etype, s, e in tags_to_spans(list(tags))]
    return ENTITY_SEP.join(parts) if parts else NO_ENTITIES


def _find(words: list[str], toks: list[str], taken: list[bool], start: int) -> int:
    """First index >= start where `words` matches `toks` on untagged tokens; -1 when there is none."""
    n = len(words)
    for k in range(start, len(toks) - n + 1):
        if toks[k : k + n] == words and not any(taken[k : k + n]):
            return k
    return -1


def _split_items(text: str) -> tuple[list[str], bool]:
    """Entity items of an output, and whether only the canonical separator was used."""
    canonical = "\n" not in text and ";" not in text
    items: list[str] = []
    for chunk in text.split("|"):
        # Newlines / semicolons between entities are a wrong separator; keep the entities anyway.
        for line in re.split(r"[\n;]", chunk):
            if line.strip():
                items.append(line.strip())
    return items, canonical


def _type_lookup(types: Sequence[str] | None, aliases: Mapping[str, str] | None):
    """name as written -> type (or None): case-insensitive, whitespace-normalised, via aliases."""

    def key(name: str) -> str:
        return " ".join(name.split()).casefold()

    if aliases is None:
        aliases = TYPE_ALIASES if types is not None and set(types) == set(ENTITY_TYPES) else {}
    known = {key(a): t for a, t in aliases.items()}
    if types is not None:
        known.update({key(t): t for t in types})  # a type's own name wins over an alias

    def lookup(name: str) -> str | None:
        hit = known.get(key(name))
        if hit is not None or types is not None:
            return hit
        name = " ".join(name.split())  # any type accepted: the name as written
        return None if type_name_problem(name) else name

    return lookup


def _split_item(item: str, lookup) -> tuple[str | None, str]:
    """`TYPE: words` -> (type or None, words). `TYPE= words` is tolerated (not canonical)."""
    for sep in (":", "="):
        head, found, rest = item.partition(sep)
        if found and head.strip():
            etype = lookup(head)
            if etype is not None:
                return etype, rest.strip()
    return None, ""


def ner_parse(
    text: str | None,
    tokens: Sequence[str],
    types: Sequence[str] | None = ENTITY_TYPES,
    aliases: Mapping[str, str] | None = None,
) -> tuple[list[tuple[str, str]], list[str], bool]:
    """Align a linearised entity string to `tokens`: returns (entities, BIO tags, valid).

    `types`: the task's entity types (default CoNLL-2003's four; None accepts any well-formed type
    name as written). `aliases`: other spellings -> type, read like the types themselves (default:
    CoNLL's `TYPE_ALIASES` when `types` are the CoNLL four, else none).

    Entities are matched left to right on whole tokens (exact first, then ignoring case), each after
    the previous one; an entity found only earlier in the sentence is still taken (out-of-order
    output). Unknown types, entities not in the sentence, overlaps and wrong separators are dropped or
    repaired and make `valid` False. `valid` is True exactly when the text is the canonical
    linearisation of the returned tags. Never raises on model output.
    """
    toks = [str(t) for t in tokens]
    tags = ["O"] * len(toks)
    entities: list[tuple[str, str]] = []
    raw = "" if text is None else str(text).strip()
    if not raw:
        return entities, tags, False
    if raw.casefold().rstrip(".") == NO_ENTITIES:
        return entities, tags, raw == NO_ENTITIES
    lookup = _type_lookup(types, aliases)
    taken = [False] * len(toks)
    folded = [t.casefold() for t in toks]
    ok = True
    items, canonical = _split_items(raw)
    ok &= canonical
    cursor = 0
    for item in items:
        etype, etext = _split_item(item, lookup)
        if etype is None or not etext:  # no known "TYPE:" prefix: the type cannot be guessed
            ok = False
            continue
        pieces = [etext]
        if (
            "," in etext
            and etext.split()
            and _locate(etext.split(), toks, folded, taken, cursor) is None
        ):
            pieces = [
                p.strip() for p in etext.split(",") if p.strip()
            ]  # "PER: A, B" -> two entities
            ok = False
        for piece in pieces:
            words = piece.split()
            hit = _locate(words, toks, folded, taken, cursor)
            if hit is None:
                ok = False
                continue
            k, exact = hit
            ok &= exact and k >= cursor
            tags[k] = f"B-{etype}"
            for j in range(k + 1, k + len(words)):
                tags[j] = f"I-{etype}"
            for j in range(k, k + len(words)):
                taken[j] = True
            entities.append((etype, " ".join(toks[k : k + len(words)])))
            cursor = max(cursor, k + len(words))
    valid = ok and " ".join(raw.split()) == ner_linearize(toks, tags)
    return entities, tags, valid


def _locate(
    words: list[str], toks: list[str], folded: list[str], taken: list[bool], cursor: int
) -> tuple[int, bool] | None:
    """(start index, exact case) of an entity's words: after the cursor first, then anywhere."""
    if not words:
        return None
    for start in (cursor, 0):
        k = _find(words, toks, taken, start)
        if k >= 0:
            return k, True
        k = _find([w.casefold() for w in words], folded, taken, start)
        if k >= 0:
            return k, False
    return None
