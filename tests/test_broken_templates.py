"""Broken templates and broken rows: each must give an exact `file:line: message` and exit 2, never a traceback.

Every fixture in tests/fixtures/broken/ (names not starting with '_') states what `validate` must
report in header lines `# expect: [FILE:]LINE: fragment` (FILE relative to the fixture's folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from t2t_mtl.cli.main import main

BROKEN = Path(__file__).resolve().parent / "fixtures" / "broken"
EXPECT = re.compile(r"^# expect: (?:(?P<file>[^\s:]+):)?(?P<line>\d+): (?P<frag>.+)$")


def _expectations(path: Path) -> list[tuple[Path, int, str]]:
    out = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        m = EXPECT.match(ln)
        if m:
            target = (path.parent / m["file"]).resolve() if m["file"] else path
            out.append((target, int(m["line"]), m["frag"]))
    return out


CASES = [pytest.param(p, _expectations(p), id=p.stem) for p in sorted(BROKEN.glob("[!_]*.yaml"))]


def _assert_reported(err: str, expects) -> None:
    lines = err.splitlines()
    for target, line, frag in expects:
        prefix = f"{target}:{line}: "
        assert any(ln.startswith(prefix) and frag in ln for ln in lines), (
            f"expected a line starting {prefix!r} containing {frag!r}; got:\n{err}"
        )


def test_suite_is_big_enough():
    assert len(CASES) >= 20
    assert all(c.values[1] for c in CASES), (
        "every broken fixture must state at least one expectation"
    )


@pytest.mark.parametrize("path,expects", CASES)
def test_broken_fixture_reports_exact_location(path, expects, capsys):
    rc = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""  # validate writes problems and the summary on stderr only
    assert "Traceback" not in err
    _assert_reported(err, expects)
    assert err.splitlines()[-1].startswith("validate: ")
    # Every reported problem is one `file:line: message` line (the summary is the only other line).
    for ln in err.splitlines()[:-1]:
        assert re.match(r"^\S+:\d+: ", ln), ln


def test_whole_folder_reports_every_expectation(capsys):
    rc = main(["validate", str(BROKEN)])
    _, err = capsys.readouterr()
    assert rc == 2
    for case in CASES:
        _assert_reported(err, case.values[1])
    n_files = len(
        list(BROKEN.glob("*.yaml"))
    )  # an explicitly named folder: snippets are checked too
    assert f"{n_files} template(s) checked" in err.splitlines()[-1]


def test_console_script_subprocess(tmp_path):
    script = Path(sys.executable).parent / "t2t-mtl"
    exe = [str(script)] if script.exists() else [shutil.which("t2t-mtl") or "t2t-mtl"]
    env = dict(os.environ, T2T_MTL_TEMPLATES="")
    r = subprocess.run(
        exe + ["validate", str(BROKEN / "undefined_var.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stdout == ""
    assert (
        f"{BROKEN / 'undefined_var.yaml'}:9: variant 'direct' input: undefined variable 'txt'"
        in r.stderr
    )
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ broken rows through preview


def test_bad_rows_fail_lists_every_row(capsys):
    rc = main(["preview", str(BROKEN / "rows_task.yaml"), "-n", "20", "--bad-rows", "fail"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    _assert_reported(
        err, [e for e in _expectations(BROKEN / "rows_task.yaml") if e[0].name == "train.jsonl"]
    )
    assert "rows_task/train: 7 bad row(s) in" in err


def test_bad_rows_skip_counts_them_on_stderr(capsys):
    rc = main(["preview", str(BROKEN / "rows_task.yaml"), "-n", "20"])
    out, err = capsys.readouterr()
    assert rc == 0
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert [r["input"] for r in recs] == ["fine film", "good again"]  # the only two good rows
    data = BROKEN / "data" / "rows_task" / "train.jsonl"
    assert (
        f"rows_task/train: 7 bad rows skipped (first: {data}:2: label 'neutral' not in answer_choices"
        in err
    )


def test_bad_rows_blank_lines_keep_line_numbers(capsys):
    # validation.jsonl is valid JSON (read by `datasets`, which drops the blank line 2).
    rc = main(
        ["preview", str(BROKEN / "rows_task.yaml"), "--split", "validation", "--bad-rows", "fail"]
    )
    _, err = capsys.readouterr()
    assert rc == 2
    assert (
        f"{BROKEN / 'data' / 'rows_task' / 'validation.jsonl'}:4: label 'neutral' not in answer_choices"
        in err
    )


def test_bad_csv_rows_count_the_header(tmp_path, capsys):
    f = tmp_path / "train.csv"
    f.write_text("txt,label\nfine film,1\nso-so,neutral\n,0\n", encoding="utf-8")
    rc = main(
        [
            "preview",
            str(BROKEN / "rows_task.yaml"),
            "--source",
            str(f),
            "--columns",
            "txt=text",
            "--bad-rows",
            "fail",
        ]
    )
    _, err = capsys.readouterr()
    assert rc == 2
    assert f"{f}:3: label 'neutral' not in answer_choices" in err
    assert f"{f}:4: field 'text' is empty in this row (column 'txt')" in err  # an empty CSV cell


def test_bad_csv_rows_after_multiline_fields_name_the_right_line(tmp_path, capsys):
    f = tmp_path / "train.csv"
    f.write_text(
        'txt,label\n"a film\nin two lines",1\n\nso-so,neutral\n"x,\n\ny",2\n', encoding="utf-8"
    )
    rc = main(
        [
            "preview",
            str(BROKEN / "rows_task.yaml"),
            "--source",
            str(f),
            "--columns",
            "txt=text",
            "--bad-rows",
            "fail",
        ]
    )
    _, err = capsys.readouterr()
    assert rc == 2
    assert f"{f}:5: label 'neutral' not in answer_choices" in err  # not :3 (row index + header)
    assert (
        f"{f}:6: label 2 not in answer_choices" in err
        or f"{f}:6: label '2' not in answer_choices" in err
    )


def test_bad_parquet_rows_are_numbered_from_1(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["good", "bad label", "fine"], "label": [1, 5, 0]}), f)
    rc = main(["preview", str(BROKEN / "rows_task.yaml"), "--source", str(f), "--bad-rows", "fail"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert f"{f}:2: label 5 not in answer_choices" in err  # the 2nd row, as in JSONL and CSV
    rc = main(["preview", str(BROKEN / "rows_task.yaml"), "--source", str(f)])
    out, err = capsys.readouterr()
    assert rc == 0 and [json.loads(x)["output"] for x in out.splitlines()] == [
        "positive",
        "negative",
    ]
    assert "rows_task/train: 1 bad row skipped" in err


def test_missing_split_file_suggests_mapping(tmp_path, capsys):
    (tmp_path / "train_v2.jsonl").write_text('{"text": "x", "label": 1}\n', encoding="utf-8")
    rc = main(["preview", str(BROKEN / "rows_task.yaml"), "--source", str(tmp_path)])
    _, err = capsys.readouterr()
    assert rc == 2
    assert (
        f"{tmp_path}: no train.jsonl/.csv/.parquet for split 'train' (did you mean 'train_v2'?"
        in err
    )
    rc = main(
        [
            "preview",
            str(BROKEN / "rows_task.yaml"),
            "--source",
            str(tmp_path),
            "--splits",
            "train=train_v2",
        ]
    )
    out, _ = capsys.readouterr()
    assert rc == 0 and json.loads(out)["output"] == "positive"


def _squad_with_empty_answers(tmp_path) -> Path:
    rows = [
        {
            "id": "1",
            "title": "t",
            "context": "Paris is in France.",
            "question": "Where is Paris?",
            "answers": {"text": ["France"], "answer_start": [12]},
        },
        {
            "id": "2",
            "title": "t",
            "context": "Bern is in Switzerland.",
            "question": "Where is Bern?",
            "answers": {"text": [], "answer_start": []},
        },
    ]  # SQuAD v2-style unanswerable row
    f = tmp_path / "squad.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return f


def test_row_the_template_cannot_render_is_a_bad_row(tmp_path, capsys):
    """A template failing on one row is a bad row: skipped and counted (the rest is previewed), or
    with `fail` an error; either way it names the data row (file:row) *and* the template line."""
    f = _squad_with_empty_answers(tmp_path)
    args = ["preview", "qa_squad", "--source", str(f), "-n", "2", "--variant", "passage_question"]
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0 and [json.loads(x)["output"] for x in out.splitlines()] == ["France"]
    assert f"qa_squad/train: 1 bad row skipped (first: {f}:2: this row fails to render" in err
    assert "qa_squad.yaml:" in err and "list object has no element 0" in err
    assert "'answers['text']' has no item 0 in this row" in err  # the hint names the expression
    rc = main(args + ["--bad-rows", "fail"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    assert f"{f}:2: this row fails to render" in err and "qa_squad.yaml:" in err


def test_eval_skips_rows_the_template_cannot_render(tmp_path):
    from t2t_mtl.core.config import SourceConfig
    from t2t_mtl.evaluation.evaluator import EvalTask, load_examples
    from t2t_mtl.tasks import catalogue

    f = _squad_with_empty_answers(tmp_path)
    task = EvalTask(
        "qa_squad",
        catalogue.load_task("qa_squad"),
        SourceConfig(path=str(f), splits={"validation": "squad"}),
    )
    examples, rows = load_examples(task, "validation", None, bad_rows="skip")
    assert [ex.record.meta["row_id"] for ex in examples] == ["0"] and rows.skipped == 1
    assert rows.problems[-1].format().startswith(f"{f}:2: this row fails to render")
    assert rows.location(0) == (str(f), 1)  # kept rows keep their file's row numbers
    # and the predictions name them: a row after a skipped one keeps its own line
    first = f.read_text(encoding="utf-8").splitlines()[0]
    f.write_text(f.read_text(encoding="utf-8") + "\n" + first.replace('"1"', '"3"') + "\n")
    task = EvalTask(
        "qa_squad",
        catalogue.load_task("qa_squad"),
        SourceConfig(path=str(f), splits={"validation": "squad"}),
    )
    examples, _ = load_examples(task, "validation", None, bad_rows="skip")
    assert [ex.source for ex in examples] == [f"{f}:1", f"{f}:4"]


def test_list_and_int_fields_from_formats_that_cannot_store_them(tmp_path):
    """A CSV cell is text: a list field's cell holding a JSON array is read as that list, and any
    other text gets a hint saying how to write one; a whole-number float (pandas' nullable int
    column) is read as an int; a null in a column the row has is "empty", not "missing"."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from t2t_mtl.core.config import SourceConfig
    from t2t_mtl.tasks import catalogue, sources

    f = tmp_path / "train.csv"
    with open(f, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["tokens", "ner_tags"])
        w.writerow([json.dumps(["EU", "rejects", "German"]), json.dumps(["B-ORG", "O", "B-MISC"])])
        w.writerow(["EU rejects", "B-ORG O"])
    tpl = catalogue.load_task("ner_conll2003")
    rows = sources.load_rows(tpl, SourceConfig(path=str(f)), "train", bad_rows="skip")
    assert len(rows) == 1 and rows[0]["tokens"] == ["EU", "rejects", "German"]
    assert rows[0]["ner_tags"] == ["B-ORG", "O", "B-MISC"]
    first = rows.problems[0].format()
    assert first.startswith(f"{f}:3: field 'tokens' should be a list, got str 'EU rejects'")
    assert "write it as a JSON array" in first

    from t2t_mtl.tasks.task import load_task_file

    (tmp_path / "stars.yaml").write_text(INT_TEMPLATE, encoding="utf-8")
    tpl = load_task_file(tmp_path / "stars.yaml")
    p = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None], "stars": [2.0, None, 1.0]}), p)
    rows = sources.load_rows(tpl, SourceConfig(path=str(p)), "train", bad_rows="skip")
    assert [r["stars"] for r in rows] == [2] and isinstance(rows[0]["stars"], int)
    assert [x.format().split(" (")[0] for x in rows.problems] == [
        f"{p}:2: field 'stars' is empty in this row",
        f"{p}:3: field 'text' is empty in this row",
    ]


INT_TEMPLATE = """\
name: stars
task_type: generation
version: 1
fields: {text: str, stars: int}
variants:
  - id: v
    instruction: "How many stars?"
    input: "{{ text }}"
    output: "{{ stars }}"
metric: [rouge]
parse: text
"""


def test_a_field_from_an_include_that_the_rows_lack_names_the_include(tmp_path):
    """A label task that includes the shared label snippet and names its own label field still has
    the snippet's `label` field: the missing-field message says where that field comes from and
    which column to map onto it."""
    from t2t_mtl.tasks import sources
    from t2t_mtl.tasks.task import load_task_file

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        '{"review": "great food", "mood": "good"}\n', encoding="utf-8"
    )
    (tmp_path / "mood.yaml").write_text(
        "name: mood\ntask_type: classification\nversion: 1\ninclude: _shared/label_task.yaml\n"
        "source: {path: data}\nfields: {review: str, mood: label}\nlabel_field: mood\n"
        "answer_choices: [good, bad]\nvariants:\n"
        '  - {id: v, instruction: "Mood?", input: "{{ review }}", output: "{{ mood }}"}\n',
        encoding="utf-8",
    )
    tpl = load_task_file(tmp_path / "mood.yaml")
    rows = sources.load_rows(tpl, None, "train", bad_rows="skip")
    msg = rows.problems[0].format()
    assert "missing field 'label'" in msg and "declared in label_task.yaml" in msg
    assert "columns: {mood: label}" in msg
