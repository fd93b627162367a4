"""The oracle check: every task's own gold outputs, given back as answers, score 100 with 0 % invalid.

Shipped templates on their bundled samples and on the real slices (when present), the unusual
templates in tests/fixtures/oracle/ (own NER types, 20 odd class names), templates that cannot
express their data (reported with file:row, exit 2), `validate --oracle` with and without a run
config, and an end-to-end user NER template: validate -> preview -> oracle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_templates_engine import REAL  # shipped task -> (real data folder, split with gold labels)

from t2t_mtl.cli.main import main
from t2t_mtl.core.config import SourceConfig, load_config
from t2t_mtl.core.errors import T2TError
from t2t_mtl.evaluation import metrics, oracle
from t2t_mtl.tasks import catalogue, sources
from t2t_mtl.tasks.schema import PARSE_KINDS
from t2t_mtl.tasks.task import load_task_file

ROOT = Path(__file__).resolve().parents[1]
ORACLE_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oracle"


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch):
    monkeypatch.delenv(catalogue.ENV_VAR, raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _shipped_files() -> list[Path]:
    return sorted(catalogue.SHIPPED_DIR.glob("[!_]*.yaml"))


def _assert_perfect(report: oracle.TaskOracle, variants: int) -> None:
    assert report.ok, "\n".join(p.format() for p in report.all_problems())
    assert len({r.variant for r in report.results}) == variants
    for r in report.results:
        assert r.n > 0 and r.n == r.rows, (r.variant, r.split)
        assert r.score == pytest.approx(100.0) and r.invalid_rate == 0.0
        assert r.failed == 0 and not r.failures


# ------------------------------------------------------------------ every task scores 100


def test_every_shipped_template_scores_100_on_its_bundled_samples():
    files = _shipped_files()
    reports, untried = oracle.oracle_templates(files)
    assert not untried and [r.task for r in reports] == [f.stem for f in files]
    for rep in reports:
        _assert_perfect(rep, len(rep.template.variants))
        assert {r.split for r in rep.results} == {"train", "validation"}


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_shipped_template_scores_100_on_its_real_slice(name, real_data_dir):
    folder, split = REAL[name]
    tpl = catalogue.load_task(name)
    rows = sources.load_rows(tpl, SourceConfig(path=str(real_data_dir / folder)), split)
    assert rows.skipped == 0 and len(rows) > 100
    results = oracle.oracle_check(tpl, rows)
    assert [r.variant for r in results] == [v.id for v in tpl.variants]
    for r in results:
        assert r.ok, [f.problem(name, r.variant, tpl.parse).format() for f in r.failures]
        assert r.n == len(rows) and r.score == pytest.approx(100.0) and r.invalid_rate == 0.0


def test_unusual_templates_score_100():
    files = sorted(ORACLE_FIXTURES.glob("*.yaml"))
    reports, untried = oracle.oracle_templates(files)
    assert not untried and len(reports) == len(files) >= 3
    by_name = {r.task: r for r in reports}
    for rep in reports:
        _assert_perfect(rep, len(rep.template.variants))
    ner = by_name["ner_custom_types"].template
    assert ner.entity_types == ["person", "creative-work", "Product Name", "LOC2", "per.son"]
    assert by_name["ner_tag_map"].template.entity_types == ["person", "creative-work"]
    many = by_name["many_classes"].template
    assert len(many.answer_choices) == 20 and {"not sure", "Sci/Tech", "5 stars"} <= set(
        many.answer_choices
    )
    # every class occurs among the gold labels, so macro-F1 100 means each was read back
    rows = sources.load_rows(many, None, "validation")
    assert {rows[i]["label"] for i in range(len(rows))} == set(many.answer_choices)


def test_checked_templates_cover_every_parse_kind_and_metric():
    tpls = [load_task_file(f) for f in _shipped_files() + sorted(ORACLE_FIXTURES.glob("*.yaml"))]
    assert {t.parse for t in tpls} == set(PARSE_KINDS)
    assert {t.primary_metric for t in tpls} == set(metrics.METRIC_NAMES)


# ------------------------------------------------------------------ templates that cannot express their data


NER_TWO_VARIANTS = """\
    name: {name}
    task_type: ner
    version: 1
    samples: {data}
    fields:
      tokens: list[str]
      ner_tags: list[label]
    label_field: ner_tags
    entity_types: [person, place]
    variants:
      - id: canonical
        input: "{{{{ tokens | join(' ') }}}}"
        output: "{{{{ tokens | ner_linearize(ner_tags) }}}}"
      - id: lowered
        input: "{{{{ tokens | join(' ') }}}}"
        output: "{{{{ tokens | ner_linearize(ner_tags) | lower }}}}"
    metric: span_f1
    parse: entities
    """


def test_oracle_lists_rows_a_template_cannot_express(tmp_path, capsys):
    data = tmp_path / "data"
    write(
        data / "validation.jsonl",
        """\
        {"tokens": ["Ada", "Lovelace", "wrote", "."], "ner_tags": ["B-person", "I-person", "O", "O"]}
        {"tokens": ["Old", "York", "is", "not", "York"], "ner_tags": ["O", "O", "O", "O", "B-place"]}
        {"tokens": ["Nothing", "."], "ner_tags": ["O", "O"]}
        """,
    )
    tpl_file = write(tmp_path / "lossy.yaml", NER_TWO_VARIANTS.format(name="lossy", data=data))
    tpl = load_task_file(tpl_file)
    rows = sources.load_rows(tpl, None, "validation")
    canonical, lowered = oracle.oracle_check(tpl, rows)
    # canonical: only the entity whose words occur untagged earlier is lost (format limit)
    assert not canonical.ok and canonical.failed == 1 and canonical.invalid_rate == 0.0
    assert canonical.score == pytest.approx(50.0)  # 1 of 2 entities right, 1 spurious
    (f,) = canonical.failures
    assert (f.file, f.row, f.output) == (str(data / "validation.jsonl"), 2, "place: York")
    assert "aligned to other tokens" in f.note
    # lowered: type names no longer match (`person` stays a type, the words are lower-cased)
    assert not lowered.ok and lowered.failed == 2 and lowered.invalid_rate > 0
    assert [x.row for x in lowered.failures] == [1, 2]
    assert lowered.failures[0].output == "person: ada lovelace"
    assert lowered.failures[0].parsed == "person: Ada Lovelace" and not lowered.failures[0].valid

    rc = main(["validate", "--oracle", str(tpl_file)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert any(
        ln.startswith(
            f"{tpl_file}:13: oracle: task 'lossy' variant 'canonical' scores span_f1 50.00"
        )
        for ln in lines
    ), err
    assert any(
        ln.startswith(
            f"{data / 'validation.jsonl'}:1: oracle: task 'lossy' variant 'lowered': "
            "gold output 'person: ada lovelace' parsed as 'person: Ada Lovelace' (invalid)"
        )
        for ln in lines
    ), err
    assert "oracle lossy (validation): span_f1 50.00, invalid 66.7 %" in err and ": FAIL" in err
    assert lines[-1].startswith("validate: ") and "problem(s)" in lines[-1]


def test_oracle_catches_answer_choices_parsing_cannot_tell_apart(tmp_path):
    data = tmp_path / "d"
    write(
        data / "validation.jsonl", '{"text": "a", "label": "yes"}\n{"text": "b", "label": "Yes"}\n'
    )
    tpl_file = write(
        tmp_path / "twins.yaml",
        f"""\
        name: twins
        task_type: classification
        version: 1
        samples: {data}
        fields: {{text: str, label: label}}
        answer_choices: ["yes", "Yes"]
        variants:
          - id: v
            input: "{{{{ text }}}}"
            output: "{{{{ label }}}}"
        metric: accuracy
        parse: label
        """,
    )
    # The parser ignores case, so the template itself is refused before any row is scored.
    with pytest.raises(T2TError) as e:
        load_task_file(tpl_file)
    assert "answer_choices differ only in case or spaces: 'yes' / 'Yes'" in str(e.value.problems)


def test_validate_oracle_checks_templates_on_their_own_source_and_the_ones_named(tmp_path, capsys):
    """A template without bundled samples is checked on its own source; with --config, the
    templates named are checked (not the config's tasks)."""
    data = tmp_path / "d"
    write(data / "train.jsonl", '{"text": "a", "label": "yes"}\n{"text": "b", "label": "no"}\n')
    write(data / "validation.jsonl", '{"text": "c", "label": "no"}\n')
    write(data / "unlabeled.jsonl", '{"text": "d"}\n')  # not a usual split: not checked
    tpl_file = write(
        tmp_path / "own.yaml",
        """\
        name: own
        task_type: classification
        version: 1
        source: {path: d}
        fields: {text: str, label: label}
        answer_choices: ["yes", "no"]
        variants:
          - {id: v, input: "{{ text }}", output: "{{ label }}"}
        metric: accuracy
        parse: label
        """,
    )
    assert main(["validate", "--oracle", str(tpl_file)]) == 0
    err = capsys.readouterr().err
    assert "oracle own (train, validation): accuracy 100.00, invalid 0.0 %, 3 rows" in err
    assert "no rows to check" not in err
    cfg = write(
        tmp_path / "run.yaml",
        f"template_dirs: [{ORACLE_FIXTURES}]\ntasks: [{{template: many_classes}}]\n",
    )
    assert main(["validate", "--oracle", "--config", str(cfg), str(tpl_file)]) == 0
    err = capsys.readouterr().err
    assert "oracle own (train, validation)" in err and "oracle many_classes" not in err


# ------------------------------------------------------------------ validate --oracle


def test_validate_oracle_on_fixtures_exits_0_and_loads_no_model_library():
    code = (
        "import sys\n"
        "from t2t_mtl.cli.main import main\n"
        f"rc = main(['validate', '--oracle', {str(ORACLE_FIXTURES)!r}])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    names = sorted(f.stem for f in ORACLE_FIXTURES.glob("*.yaml"))
    assert {"many_classes", "ner_custom_types", "ner_tag_map", "relatedness"} <= set(names)
    for name in names:
        assert f"oracle {name} (train, validation): " in proc.stderr
    assert proc.stderr.count(": OK") == len(names)


def test_validate_config_oracle_checks_the_run_sources(tmp_path, capsys):
    good = tmp_path / "good"
    write(
        good / "validation.jsonl",
        '{"tokens": ["Ada", "wrote", "Hamlet"], "ner_tags": ["B-PER", "O", "B-WORK"]}\n',
    )
    ints = tmp_path / "ints"
    write(ints / "validation.jsonl", '{"tokens": ["Ada", "wrote"], "ner_tags": [1, 0]}\n')
    cfg = write(
        tmp_path / "run.yaml",
        f"""\
        template_dirs: [{ORACLE_FIXTURES}]
        tasks:
          - template: ner_custom_types
            name: mine
            source: {{path: good}}
          - template: ner_custom_types
            name: coded
            source:
              path: ints
              labels: {{"1": B-person}}
        """,
    )
    rc = main(["validate", "--oracle", "--config", str(cfg), "--no-trial"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert (
        "oracle mine (validation): span_f1 100.00, invalid 0.0 %, 1 rows x 2 variant(s): OK" in err
    )
    assert "oracle coded (validation): no rows to check: FAIL" in err
    # the map that leaves no good row is reported at the run config's line of the map
    assert (
        f"{cfg}:10: all 1 rows of {ints / 'validation.jsonl'} are bad with this labels map: " in err
    )
    assert "tag 0 in 'ner_tags' is not a tag of this task" in err
    assert f"{ints / 'validation.jsonl'}:1: tag 0 in 'ner_tags'" in err
    # without --oracle, --config still renders each template on the sources the run gives it:
    # the labels map that leaves rows bad is found there too (the run would skip or fail on them)
    assert main(["validate", "--config", str(cfg), "ner_custom_types"]) == 2
    err = capsys.readouterr().err
    assert f"{ints / 'validation.jsonl'}:1: tag 0 in 'ner_tags'" in err, err
    assert "good" not in err.split("rendered on")[0]


# ------------------------------------------------------------------ end to end


def test_user_ner_template_with_its_own_types_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    rows = [
        (["Ada", "Lovelace", "wrote", "Notes", "."], [1, 2, 0, 3, 0]),
        (["The", "Pixel", "8", "sold", "in", "Zone", "51"], [0, 5, 6, 0, 0, 7, 8]),
        (["nothing", "here"], [0, 0]),
    ]
    for split in ("train", "validation"):
        write(
            data / f"{split}.jsonl",
            "".join(json.dumps({"tokens": t, "ner_tags": g}) + "\n" for t, g in rows),
        )
    tpl_file = write(
        tmp_path / "templates" / "gadgets_ner.yaml",
        f"""\
        name: gadgets_ner
        task_type: ner
        version: 1
        source:
          labels: {{"0": O, "1": B-person, "2": I-person, "3": B-creative-work,
                    "4": I-creative-work, "5": B-Product Name, "6": I-Product Name,
                    "7": B-zone.2, "8": I-zone.2}}
        samples: {data}
        fields:
          tokens: list[str]
          ner_tags: list[label]
        label_field: ner_tags
        variants:
          - id: list
            instruction: "List the entities as TYPE: words | TYPE: words, or none."
            input: "{{{{ tokens | join(' ') }}}}"
            output: "{{{{ tokens | ner_linearize(ner_tags) }}}}"
        metric: span_f1
        parse: entities
        """,
    )
    assert main(["validate", str(tpl_file)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["preview", str(tpl_file), "--split", "validation", "-n", "3"]) == 0
    out = [json.loads(ln)["output"] for ln in capsys.readouterr().out.splitlines()]
    assert out == [
        "person: Ada Lovelace | creative-work: Notes",
        "Product Name: Pixel 8 | zone.2: Zone 51",
        "none",
    ]
    tpl = load_task_file(tpl_file)
    assert tpl.entity_types == ["person", "creative-work", "Product Name", "zone.2"]
    assert tpl.parse_output(out[1], tokens=rows[1][0]).value == [
        "O", "B-Product Name", "I-Product Name", "O", "O", "B-zone.2", "I-zone.2"
    ]  # fmt: skip
    assert main(["validate", "--oracle", str(tpl_file)]) == 0
    err = capsys.readouterr().err
    assert "oracle gadgets_ner (train, validation): span_f1 100.00, invalid 0.0 %" in err


def test_validate_oracle_limit(capsys):
    many = str(ORACLE_FIXTURES / "many_classes.yaml")
    assert main(["validate", "--oracle", "--limit", "2", many]) == 0
    assert (
        "oracle many_classes (train, validation): macro_f1 100.00, invalid 0.0 %, 4 rows x 2 "
        in (capsys.readouterr().err)
    )
    assert main(["validate", "--oracle", "--limit", "0", many]) == 2
    assert "<cli>: --limit must be >= 1" in capsys.readouterr().err


def test_oracle_config_reads_each_task_on_its_split(tmp_path):
    cfg_file = write(
        tmp_path / "run.yaml",
        f"""\
        template_dirs: [{ORACLE_FIXTURES}]
        tasks: [{{template: many_classes}}, {{template: ner_tag_map, name: tags}}]
        eval: {{split: train}}
        """,
    )
    reports = oracle.oracle_config(load_config(cfg_file))
    assert [r.task for r in reports] == ["many_classes", "tags"]
    assert all(r.ok and {x.split for x in r.results} == {"train"} for r in reports)
    assert reports[1].results[0].task == "tags"


def test_oracle_explains_a_corpus_metric_that_misses_100_on_rows_that_read_back(tmp_path, capsys):
    """Every row reads back, yet corpus BLEU of short answers is 0 and a correlation of constant
    golds is undefined: FAIL with the reason at the variant, not 'the rows listed below' (none)."""
    data = tmp_path / "d"
    data.mkdir()
    for split in ("train", "validation"):
        rows = [
            {"a": w, "b": t, "score": 3}
            for w, t in (("yes", "ja"), ("no", "nein"), ("bye", "tschüß"))
        ]
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    short = write(
        tmp_path / "short.yaml",
        f"""\
        name: short
        task_type: generation
        version: 1
        samples: {data}
        fields: {{a: str, b: str, score: int}}
        variants:
          - id: v
            input: "{{{{ a }}}}"
            output: "{{{{ b }}}}"
        metric: [bleu, chrf]
        parse: text
        """,
    )
    flat = write(
        tmp_path / "flat.yaml",
        f"""\
        name: flat
        task_type: regression
        version: 1
        samples: {data}
        fields: {{a: str, b: str, score: int}}
        variants:
          - id: v
            input: "{{{{ a }}}}"
            output: "On a 1-5 scale: {{{{ score }}}}"
        metric: [spearman]
        parse: number
        """,
    )
    assert main(["validate", "--oracle", str(short), str(flat)]) == 2
    err = capsys.readouterr().err
    assert "oracle short (train, validation): bleu 0.00" in err and ": FAIL" in err
    assert "corpus BLEU is 0 when no output has four words" in err and "put it first" in err
    assert (
        "a correlation needs at least two different gold numbers; every output parses as 1" in err
    )
    assert "rows listed below" not in err
