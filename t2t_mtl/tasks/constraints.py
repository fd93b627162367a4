"""What a generated answer may be, as the template declares it: constrained decoding's rules.

Evaluation mode `constrained` (a template's or a run task's `eval_mode`, or `t2t-mtl eval --mode
constrained`) generates greedily but takes, at each step, the most likely token that keeps the answer
*viable*: still completable into an answer of the form below. The rules are plain text predicates
(no tokenizer, no torch), so they hold for any tokenizer and any task a user writes:

- `label`: the answer is one of `answer_choices`, spelled exactly as there (the spelling training
  taught; free decoding's tolerant parser would also read other cases, but spending steps on them
  gains nothing).
- `span`: the answer is copied from the record's input (a substring of it; case ignored and
  whitespace runs counted as one space, as the span metrics read answers) and ends where a word of
  the input ends (`H` of `Hesburgh` is no answer; the model goes on to copy the word).
- `entities`: the canonical linearisation (`parsing.ner_linearize`): `none`, or `TYPE: words` items
  joined by ` | `, each TYPE one of the task's entity types as spelled there (any well-formed name
  when the task declares none), each `words` a run of whole tokens of the sentence (case ignored),
  and no run listed more often than it occurs in the sentence (`LOC: Leicestershire |
  ORG: Leicestershire` is refused when the sentence names Leicestershire once).
- `text`: free; `for_task` returns None and the task generates as in mode `generate`.

`viable(text)`: can `text` (the raw answer decoded so far) still be completed into an allowed answer?
`complete(text)`: may the answer end here? Line breaks are never viable: every parser reads the
answer as one line. Both are total functions of the text: they never raise on model output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from t2t_mtl.tasks.parsing import ENTITY_SEP, NO_ENTITIES, type_name_problem

__all__ = [
    "AnswerConstraint",
    "ChoiceConstraint",
    "CopyConstraint",
    "EntityConstraint",
    "FORM",
    "admits",
    "for_task",
]

# What each kind's constraint allows, in words (for messages).
FORM = {
    "label": "one of answer_choices",
    "span": "text copied from the input, ending at a word end",
    "entities": "`TYPE: words` items of the task's types, words from the sentence, none repeated",
    "text": "free text",
    "number": "a number",
}
_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029")
# A byte-level tokenizer decodes the first bytes of a multi-byte character as U+FFFD each; the
# next tokens complete it. A UTF-8 character has at most 4 bytes, so at most 3 are pending.
_PARTIAL = "\ufffd"
_MAX_PENDING = 3


def _one_space(text: str) -> str:
    return " ".join(text.split())


class AnswerConstraint:
    """`viable(text)` and `complete(text)` (see the module docstring) on the raw decoded answer.

    Both drop one leading whitespace character (more is never viable: a model could otherwise
    fill its budget with spaces) and refuse line breaks here; subclasses judge the clean text in
    `_viable` / `_complete`. A text ending inside a character (1-3 U+FFFD) is viable when some
    non-ASCII character of the rule's own material (choices, input, tokens, types: `_wide`) can
    come next, never complete; with ASCII material a half character is never viable, so a model
    cannot wander off into byte soup.
    """

    _wide: frozenset[str] = frozenset()

    def _set_material(self, *texts: str) -> None:
        self._wide = frozenset(ch for t in texts for ch in t if ord(ch) > 127)

    def viable(self, text: str) -> bool:
        a = text.lstrip()
        if any(b in text for b in _BREAKS) or len(text) - len(a) > 1:
            return False
        clean = a.rstrip(_PARTIAL)
        pending = len(a) - len(clean)
        if not pending:
            return self._viable(a)
        if pending > _MAX_PENDING:
            return False
        return any(self._viable(clean + ch) for ch in self._wide)

    def complete(self, text: str) -> bool:
        a = text.strip()
        if any(b in text for b in _BREAKS) or text.endswith(_PARTIAL) or text.find(a[:1]) > 1:
            return False
        return self._complete(a)

    def _viable(self, a: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def _complete(self, a: str) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class ChoiceConstraint(AnswerConstraint):
    """`label`: one of `choices`, spelled exactly as there."""

    choices: Sequence[str]

    def __post_init__(self) -> None:
        self.choices = tuple(c for c in self.choices if c)
        self._set_material(*self.choices)

    def _viable(self, a: str) -> bool:
        return any(c.startswith(a) for c in self.choices)

    def _complete(self, a: str) -> bool:
        return a in self.choices


@dataclass
class CopyConstraint(AnswerConstraint):
    """`span`: a non-empty substring of `source` (case ignored, whitespace runs read as single
    spaces) that ends at the end of a word of `source` (or with a non-alphanumeric character)."""

    source: str
    _norm: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._norm = _one_space(self.source).casefold()
        self._set_material(_one_space(self.source))

    def _viable(self, a: str) -> bool:
        return a.casefold() in self._norm

    def _complete(self, a: str) -> bool:
        a, src = a.casefold(), self._norm
        if not a:
            return False
        if not a[-1].isalnum():
            return a in src
        k = src.find(a)
        while k >= 0:
            end = k + len(a)
            if end == len(src) or not src[end].isalnum():
                return True
            k = src.find(a, k + 1)
        return False


@dataclass
class EntityConstraint(AnswerConstraint):
    """`entities`: the canonical linearisation over `tokens` with types `types` (None: any name);
    words are compared ignoring case (the parser aligns `three-year-old` to `Three-year-old` and
    scores it; refusing it ended answers before entities that scored).

    Items are aligned to the sentence as `parsing.ner_parse` aligns them (the first free occurrence
    after the previous item, else the first free one anywhere; exact case), so each item takes
    tokens no earlier item took: an entity is not listed more often than the sentence holds it."""

    tokens: Sequence[str]
    types: Sequence[str] | None
    _toks: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # words compared ignoring case, as `parsing.ner_parse` aligns them when no exact match exists
        self._toks = [str(t).casefold() for t in self.tokens]
        self._set_material(*(str(t) for t in self.tokens), *(self.types or ()))

    def _type_ok(self, name: str, partial: bool) -> bool:
        if self.types is None:
            return partial or not type_name_problem(name)
        return any(t.startswith(name) if partial else t == name for t in self.types)

    def _place(self, words: str, taken: set[int], cursor: int) -> int:
        """Start of the first free whole-token occurrence of `words` (after `cursor` first); -1."""
        ws = words.casefold().split(" ")
        n, toks = len(ws), self._toks
        for start in (cursor, 0):
            for k in range(start, len(toks) - n + 1):
                if toks[k : k + n] == ws and not any(j in taken for j in range(k, k + n)):
                    return k
        return -1

    def _align(self, items: list[str]) -> tuple[set[int], int] | None:
        """(taken token positions, cursor) after the complete `items`; None when one is not allowed."""
        taken: set[int] = set()
        cursor = 0
        for item in items:
            head, sep, words = item.partition(": ")
            if not sep or not words or not self._type_ok(head, False):
                return None
            k = self._place(words, taken, cursor)
            if k < 0:
                return None
            n = len(words.split(" "))
            taken.update(range(k, k + n))
            cursor = max(cursor, k + n)
        return taken, cursor

    def _surface_viable(self, words: str, taken: set[int]) -> bool:
        """Can `words` still grow into a run of free whole tokens?"""
        toks, words = self._toks, words.casefold()
        for i in range(len(toks)):
            run = ""
            for j in range(i, len(toks)):
                if j in taken:
                    break
                run = f"{run} {toks[j]}" if run else toks[j]
                if len(run) >= len(words):
                    if run.startswith(words):
                        return True
                    break
                if not words.startswith(run):
                    break
        return False

    def _viable(self, a: str) -> bool:
        if NO_ENTITIES.startswith(a):
            return True
        if "  " in a:
            return False
        parts = a.split(ENTITY_SEP)
        state = self._align(parts[:-1])
        if state is None:
            return False
        last, taken = parts[-1], state[0]
        if len(taken) >= len(self._toks):
            return False  # every token is taken: nothing left to list
        if ":" not in last:  # still typing the type name (or its ":")
            return self._type_ok(last, True)
        head, _, words = last.partition(":")
        if not self._type_ok(head, False):
            return False
        if words in ("", " "):
            return True
        if not words.startswith(" "):
            return False
        if self._surface_viable(words[1:], taken):
            return True
        # a complete item followed by the start of the separator: "PER: John |", "PER: John "
        for cut in (1, 2):
            if len(last) > cut and ENTITY_SEP.startswith(last[-cut:]):
                after = self._align([*parts[:-1], last[:-cut]])
                if after is not None and len(after[0]) < len(self._toks):
                    return True
        return False

    def _complete(self, a: str) -> bool:
        if a == NO_ENTITIES:
            return True
        return bool(a) and self._align(a.split(ENTITY_SEP)) is not None


def for_task(
    kind: str,
    *,
    answer_choices: Sequence[str] | None = None,
    source: str | None = None,
    tokens: Sequence[str] | None = None,
    entity_types: Sequence[str] | None = None,
) -> AnswerConstraint | None:
    """The constraint of one answer of parse kind `kind`: `answer_choices` (label), the record's
    `source` text to copy from (span), the sentence's `tokens` and the task's `entity_types`
    (entities). None for `text` and when what the rule needs is missing (then generation is free)."""
    if kind == "label" and answer_choices:
        return ChoiceConstraint(list(answer_choices))
    if kind == "span" and source:
        return CopyConstraint(source)
    if kind == "entities" and tokens is not None:
        return EntityConstraint(list(tokens), list(entity_types) if entity_types else None)
    return None


def admits(c: AnswerConstraint, answer: str) -> bool:
    """Can constrained decoding produce `answer`? It is complete and every prefix of it is viable
    (character by character: finer than any tokenizer's steps)."""
    return c.complete(answer) and all(c.viable(answer[:i]) for i in range(len(answer) + 1))
