"""Parsing generated text: labels, spans, summaries, and the NER linearise <-> parse round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from t2t_mtl.tasks import catalogue
from t2t_mtl.tasks.parsing import (
    Parsed,
    labels_linearize,
    ner_linearize,
    ner_parse,
    parse,
    parse_label,
    parse_labels,
    parse_number,
    parse_span,
    split_tag_map,
    tag_type,
    tags_to_spans,
    type_name_problem,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- NER round trip


def _real_ner_rows():
    folder = REAL / "ner_conll2003"
    files = [folder / f"{s}.jsonl" for s in ("train", "validation", "test")]
    if not all(f.is_file() for f in files):
        pytest.skip(f"real CoNLL-2003 slice not found under {folder}")
    for f in files:
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield f.stem, json.loads(line)


def test_ner_round_trip_every_real_row():
    """linearise -> parse gives back the exact tags on every sentence of the real slice."""
    n = entities = 0
    failures = []
    for split, row in _real_ner_rows():
        text = ner_linearize(row["tokens"], row["ner_tags"])
        ents, tags, valid = ner_parse(text, row["tokens"])
        n += 1
        entities += len(ents)
        if tags != row["ner_tags"] or not valid or len(ents) != len(tags_to_spans(row["ner_tags"])):
            failures.append((split, row["id"], text))
    print(f"NER round trip: {n} sentences, {entities} entities, {len(failures)} failures")
    assert n > 0
    assert not failures, f"{len(failures)} of {n} rows do not round-trip, first: {failures[:3]}"


def test_ner_round_trip_bundled_samples():
    """The shipped samples (integer tags, mapped by the template's label map) round-trip too."""
    tpl = catalogue.load_task("ner_conll2003")
    names = tpl.source["labels"]
    count = 0
    for split in ("train", "validation"):
        with (ROOT / "data" / "ner_conll2003" / f"{split}.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                tags = [names[str(t)] for t in row["ner_tags"]]
                out = ner_parse(ner_linearize(row["tokens"], tags), row["tokens"])
                assert out[1] == tags and out[2], row["id"]
                count += 1
    assert count >= 50


@pytest.mark.parametrize(
    "tokens, tags, text",
    [
        (
            "Peter Blackburn visited New York .".split(),
            ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"],
            "PER: Peter Blackburn | LOC: New York",
        ),
        ("nothing to see here".split(), ["O"] * 4, "none"),
        ([], [], "none"),
        # adjacent entities of one type stay two entities
        (
            "Smith Jones and Brown".split(),
            ["B-PER", "B-PER", "O", "B-PER"],
            "PER: Smith | PER: Jones | PER: Brown",
        ),
        # the same text twice: the second entity aligns after the first
        ("Ajax beat Ajax reserves".split(), ["B-ORG", "O", "B-ORG", "O"], "ORG: Ajax | ORG: Ajax"),
        # a shorter entity inside a later longer one, entity at the very end
        (
            "York fans love New York".split(),
            ["B-LOC", "O", "O", "B-LOC", "I-LOC"],
            "LOC: York | LOC: New York",
        ),
        # tokens with punctuation and a colon inside an entity
        (
            "U.S. Open : Re:Mix wins".split(),
            ["B-MISC", "I-MISC", "O", "B-ORG", "O"],
            "MISC: U.S. Open | ORG: Re:Mix",
        ),
    ],
)
def test_ner_linearize_and_back(tokens, tags, text):
    assert ner_linearize(tokens, tags) == text
    ents, back, valid = ner_parse(text, tokens)
    assert back == tags and valid
    assert [e for e, _ in ents] == [t for t, _, _ in tags_to_spans(tags)]


def test_ner_linearize_rejects_length_mismatch_and_reads_stray_i_tags():
    with pytest.raises(ValueError):
        ner_linearize(["a", "b"], ["O"])
    # conlleval convention: I-X without a B-X starts an entity
    assert ner_linearize(["Paris", "Rome"], ["I-LOC", "I-LOC"]) == "LOC: Paris Rome"
    assert ner_linearize(["Paris", "Rome"], ["B-LOC", "I-PER"]) == "LOC: Paris | PER: Rome"


TOKS = "Peter Blackburn visited New York and met Anna in Paris .".split()
GOLD = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "O", "B-PER", "O", "B-LOC", "O"]


@pytest.mark.parametrize(
    "text, tags, entities",
    [
        # out of order: both recovered, but not canonical
        (
            "LOC: Paris | PER: Peter Blackburn",
            ["B-PER", "I-PER"] + ["O"] * 7 + ["B-LOC", "O"],
            [("LOC", "Paris"), ("PER", "Peter Blackburn")],
        ),
        # newline separator instead of " | "
        (
            "PER: Peter Blackburn\nLOC: New York",
            GOLD[:5] + ["O"] * 6,
            [("PER", "Peter Blackburn"), ("LOC", "New York")],
        ),
        # semicolon separator
        (
            "PER: Peter Blackburn; PER: Anna",
            ["B-PER", "I-PER"] + ["O"] * 5 + ["B-PER", "O", "O", "O"],
            [("PER", "Peter Blackburn"), ("PER", "Anna")],
        ),
        # alias type name and wrong case
        ("PERSON: peter blackburn", ["B-PER", "I-PER"] + ["O"] * 9, [("PER", "Peter Blackburn")]),
        # unknown type dropped, the rest kept
        ("FOO: Paris | PER: Anna", ["O"] * 7 + ["B-PER", "O", "O", "O"], [("PER", "Anna")]),
        # entity not in the sentence dropped, the rest kept
        ("PER: John Smith | LOC: Paris", ["O"] * 9 + ["B-LOC", "O"], [("LOC", "Paris")]),
        # two entities of one type listed with a comma
        (
            "PER: Peter Blackburn, Anna",
            ["B-PER", "I-PER"] + ["O"] * 5 + ["B-PER", "O", "O", "O"],
            [("PER", "Peter Blackburn"), ("PER", "Anna")],
        ),
        # missing "TYPE:" on one item
        ("PER: Anna | New York", ["O"] * 7 + ["B-PER", "O", "O", "O"], [("PER", "Anna")]),
        # the same entity twice but the sentence has it once: second one dropped (no overlap)
        ("LOC: Paris | LOC: Paris", ["O"] * 9 + ["B-LOC", "O"], [("LOC", "Paris")]),
        ("garbage without structure", ["O"] * 11, []),
        ("", ["O"] * 11, []),
        ("None.", ["O"] * 11, []),
        ("| | :", ["O"] * 11, []),
    ],
)
def test_ner_parse_malformed_keeps_what_it_can(text, tags, entities):
    ents, got, valid = ner_parse(text, TOKS)
    assert got == tags
    assert ents == entities
    assert valid is False


def test_ner_parse_valid_only_when_canonical():
    assert (
        ner_parse("PER: Peter Blackburn | LOC: New York | PER: Anna | LOC: Paris", TOKS)[2] is True
    )
    assert (
        ner_parse("  PER: Peter Blackburn | LOC: New York | PER: Anna | LOC: Paris \n", TOKS)[2]
        is True
    )
    assert ner_parse("PER: Peter Blackburn|LOC: New York|PER: Anna|LOC: Paris", TOKS)[2] is False
    assert (
        ner_parse("per: Peter Blackburn | LOC: New York | PER: Anna | LOC: Paris", TOKS)[1] == GOLD
    )
    # "none" on a sentence with entities is well-formed (just wrong)
    assert ner_parse("none", TOKS) == ([], ["O"] * 11, True)


def test_ner_parse_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = "PERLOCMISCorg:|;,\n -_ .Paris York NewAnna"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ents, tags, valid = ner_parse(text, TOKS)
        assert len(tags) == len(TOKS)
        assert all(t == "O" or t[:2] in ("B-", "I-") for t in tags)
    assert ner_parse(None, TOKS)[1] == ["O"] * 11


# ---------------------------------------------------------------- a task's own entity types

OWN_TYPES = ["creative-work", "Product Name", "LOC2", "per.son", "person", "Ärzte"]
OWN_TOKS = "Bob Smith read Dune in Zone 51 on a Pixel 8 with Dr. Ärzte and Bob".split()
OWN_TAGS = (
    "B-person,I-person,O,B-creative-work,O,B-LOC2,I-LOC2,O,O,B-Product Name,I-Product Name,O,"
    "B-per.son,I-per.son,O,B-Ärzte"
).split(",")
OWN_TEXT = (
    "person: Bob Smith | creative-work: Dune | LOC2: Zone 51 | Product Name: Pixel 8 | "
    "per.son: Dr. Ärzte | Ärzte: Bob"
)


def test_own_entity_types_round_trip():
    assert ner_linearize(OWN_TOKS, OWN_TAGS) == OWN_TEXT
    ents, tags, valid = ner_parse(OWN_TEXT, OWN_TOKS, OWN_TYPES)
    assert tags == OWN_TAGS and valid
    assert [t for t, _ in ents] == [t for t, _, _ in tags_to_spans(OWN_TAGS)]
    assert {t for t, _ in ents} == set(OWN_TYPES)
    # the same through parse() and with any type accepted (types unknown)
    assert parse("entities", OWN_TEXT, tokens=OWN_TOKS, entity_types=OWN_TYPES).value == OWN_TAGS
    assert ner_parse(OWN_TEXT, OWN_TOKS, None) == (ents, OWN_TAGS, True)
    # with CoNLL's default types only `person` is read (CoNLL's alias of PER); not valid
    ents, tags, valid = ner_parse(OWN_TEXT, OWN_TOKS)
    assert ents == [("PER", "Bob Smith")] and not valid


@pytest.mark.parametrize(
    "text, tag0, valid",
    [
        ("PERSON: Bob Smith", "B-person", False),  # case differs: read, not canonical
        ("human: Bob Smith", "B-person", False),  # an alias
        ("Human : Bob Smith", "B-person", False),
        ("product  name: Pixel 8", "O", False),  # whitespace normalised, case ignored
        ("person= Bob Smith", "B-person", False),  # '=' tolerated
        ("persons: Bob Smith", "O", False),  # unknown type dropped
        ("person: Bob Smith", "B-person", True),
    ],
)
def test_own_types_are_read_leniently_but_only_canonical_is_valid(text, tag0, valid):
    types = OWN_TYPES
    ents, tags, ok = ner_parse(text, OWN_TOKS, types, {"human": "person"})
    assert tags[0] == tag0 and ok is valid
    if text.startswith("product"):
        assert tags[9:11] == ["B-Product Name", "I-Product Name"]


def test_conll_aliases_only_for_the_conll_types():
    toks = ["Anna", "."]
    # the default types are CoNLL's, and so are the default aliases
    assert ner_parse("PERSON: Anna", toks)[1] == ["B-PER", "O"]
    assert ner_parse("PERSON: Anna", toks, ["PER", "LOC", "ORG", "MISC"])[1] == ["B-PER", "O"]
    assert ner_parse("PERSON: Anna", toks, ["PER", "LOC"])[1] == ["O", "O"]  # other types: none
    assert ner_parse("PERSON: Anna", toks, ["PER", "ORG", "LOC", "MISC"], {})[1] == ["O", "O"]
    # a declared type's own name wins over an alias spelt the same
    assert ner_parse("GPE: Anna", toks, ["GPE", "LOC"], {"gpe": "LOC"})[1] == ["B-GPE", "O"]


@pytest.mark.parametrize(
    "name, bad",
    [
        ("creative-work", ""),
        ("Product Name", ""),
        ("LOC2", ""),
        ("per.son", ""),
        ("x", ""),
        ("work: title", "':'"),
        ("A | B", "'|'"),
        ("a|b", "'|'"),
        ("a;b", "';'"),
        ("two\nlines", "'\\n'"),
        (" padded", "whitespace"),
        ("dou  ble", "whitespace"),
        ("", "non-empty"),
        (7, "non-empty"),
    ],
)
def test_type_name_problem(name, bad):
    why = type_name_problem(name)
    assert (why == "") if not bad else (bad in why), why


def test_tag_type_and_split_tag_map():
    assert [tag_type(t) for t in ("B-x y", "I-LOC2", "O", "B-", "X-a", 3)] == [
        "x y", "LOC2", None, None, None, None
    ]  # fmt: skip
    labels = {"0": "O", "1": "B-person", "PER": "person", "3": "B-other"}
    assert split_tag_map(labels, None) == (
        {"0": "O", "1": "B-person", "3": "B-other"},
        {"PER": "person"},
    )
    # with known types, a value naming another type's tag is not a tag of this task
    assert split_tag_map(labels, ["person"]) == (
        {"0": "O", "1": "B-person"},
        {"PER": "person", "3": "B-other"},
    )


# ---------------------------------------------------------------- labels

SENT = ["negative", "positive"]
NLI2 = ["entailment", "not_entailment"]
NLI3 = ["entailment", "neutral", "contradiction"]
AG = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.mark.parametrize(
    "text, choices, expected",
    [
        ("positive", SENT, "positive"),
        ("  Positive.\n", SENT, "positive"),
        ("NEGATIVE!", SENT, "negative"),
        (
            "\n\nnegative\nBecause the review is harsh.",
            SENT,
            "negative",
        ),  # first non-empty line only
        ("Positive sentiment", SENT, "positive"),  # starts with a choice
        ("positive, not negative", SENT, "positive"),  # a leading choice decides
        ("The sentiment is positive", SENT, "positive"),  # contains a choice as a word
        ('"negative"', SENT, "negative"),
        ("not entailment", NLI2, "not_entailment"),  # underscore vs space
        ("Not-entailment.", NLI2, "not_entailment"),
        ("entailment", NLI2, "entailment"),
        (
            "The answer is not_entailment",
            NLI2,
            "not_entailment",
        ),  # longer match wins over 'entailment'
        ("Contradiction", NLI3, "contradiction"),
        ("sci-tech", AG, "Sci/Tech"),
        ("Sci/Tech", AG, "Sci/Tech"),
        ("This is a business story", AG, "Business"),
    ],
)
def test_label_parsing_accepts(text, choices, expected):
    got = parse("label", text, answer_choices=choices)
    assert got == Parsed(expected, True)


@pytest.mark.parametrize(
    "text, choices",
    [
        ("", SENT),
        ("   \n  ", SENT),
        ("pos", SENT),  # prefix of a word is not the word
        ("positively", SENT),
        ("It could be negative, or maybe positive", SENT),  # two choices named: ambiguous
        ("I am not sure", NLI3),
        ("technology", AG),
    ],
)
def test_label_parsing_rejects(text, choices):
    got = parse("label", text, answer_choices=choices)
    assert got.value is None and got.valid is False


def test_label_exact_match_beats_word_match():
    # 'yes' and 'yes please' are both choices: the exact one wins, the starts-with one needs the longer text
    assert parse_label("yes", ["yes please", "yes"]) == "yes"
    assert parse_label("Yes please, thanks", ["yes please", "yes"]) == "yes please"


# ---------------------------------------------------------------- span, text, dispatch


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Denver Broncos", "Denver Broncos"),
        ("  the 1890s \nsecond line", "the 1890s"),
        ('Answer: "Paris"', "Paris"),
        ("The answer is: 1962", "1962"),
        ("“lodestone”", "lodestone"),
        ("", ""),
    ],
)
def test_span(text, expected):
    assert parse_span(text) == expected
    assert parse("span", text) == Parsed(expected, bool(expected))


TOPICS = ["politics", "sports", "business", "Sci/Tech"]


@pytest.mark.parametrize(
    "text, chosen, valid",
    [
        ("sports, business", ["sports", "business"], True),
        ("Business; SPORTS.", ["sports", "business"], True),  # any order, case, separator
        ("politics | sci-tech\nsports", ["politics", "Sci/Tech"], True),  # the first line only
        ("none", [], True),
        ("None.", [], True),
        ("sports, sports,", ["sports"], True),  # repeats and a trailing separator
        ("sports, cooking", ["sports"], False),  # an item naming no choice: invalid, partial credit
        ("cooking", [], False),
        ("", [], False),
    ],
)
def test_labels(text, chosen, valid):
    assert parse_labels(text, TOPICS) == (chosen, valid)
    assert parse("labels", text, answer_choices=TOPICS) == Parsed(chosen, valid)


def test_labels_linearize_round_trips():
    for chosen in ([], ["sports"], ["Sci/Tech", "politics"], TOPICS):
        text = labels_linearize(chosen, TOPICS)
        assert parse_labels(text, TOPICS) == ([c for c in TOPICS if c in chosen], True)
    assert labels_linearize(["business", "sports"], TOPICS) == "sports, business"
    assert labels_linearize([], TOPICS) == "none"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4.2", 4.2),
        ("  3\n5", 3.0),  # the first line only
        ("Answer: 3,5 points", 3.5),  # decimal comma, prefix and unit
        ("1,000", 1000.0),  # a comma before exactly three digits groups thousands
        ("12,345.5 euros", 12345.5),
        ("Score: 4/5", 4.0),
        ("-1.5", -1.5),
        ("−2", -2.0),  # the minus sign U+2212
        (".5", 0.5),
        ("1e-3", 0.001),
        ("about 4.", 4.0),
        ("x3 is not a number", None),  # digits inside a word are not a number
        ("high", None),
        ("", None),
        ("\n\nnone\n4", None),
    ],
)
def test_number(text, expected):
    assert parse_number(text) == expected
    assert parse("number", text) == Parsed(expected, expected is not None)


def test_text_and_dispatch_errors():
    assert parse("text", "  A short summary.\n") == Parsed("A short summary.", True)
    assert parse("text", "   ").valid is False
    assert parse("text", None) == Parsed("", False)
    with pytest.raises(ValueError):
        parse("labelz", "x", answer_choices=SENT)
    with pytest.raises(ValueError):
        parse("label", "x")
    with pytest.raises(ValueError):
        parse("entities", "PER: x")
    got = parse("entities", "PER: Anna", tokens=TOKS)
    assert got.valid and got.value[7] == "B-PER" and got.detail == [("PER", "Anna")]


def test_templates_parse_output_uses_their_kind():
    ner = catalogue.load_task("ner_conll2003")
    assert ner.parse_output("LOC: Paris", tokens=["Paris", "."]).value == ["B-LOC", "O"]
    rte = catalogue.load_task("nli_2way")
    assert rte.parse_output("Not entailment").value == "not_entailment"
    qa = catalogue.load_task("qa_squad")
    assert qa.parse_output("Answer: Denver Broncos\n").value == "Denver Broncos"
