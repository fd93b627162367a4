"""Template engine: loading (+include), rendering and variant policy, sources and row mapping,
the catalogue (user folders, T2T_MTL_TEMPLATES), check_config, and the validate/preview verbs.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from t2t_mtl.cli.main import main
from t2t_mtl.core.config import SourceConfig, load_config
from t2t_mtl.core.errors import DataError, TemplateError
from t2t_mtl.tasks import catalogue, sources
from t2t_mtl.tasks.task import load_task_file

GOOD = Path(__file__).resolve().parent / "fixtures" / "good"
SENT = GOOD / "toy_sentiment.yaml"
# shipped task -> (real data folder, split that has labels, extra preview args)
REAL = {
    "sentiment_sst2": ("sentiment_sst2", "validation"),
    "topic_ag_news": ("topic_ag_news", "test"),
    "nli_3way": ("nli_sick", "validation"),
    "nli_2way": ("nli_rte", "validation"),
    "qa_squad": ("qa_squad", "validation"),
    "ner_conll2003": ("ner_conll2003", "validation"),
    "summarization": ("summarization_scitldr", "validation"),
}


@pytest.fixture(autouse=True)
def _no_user_dirs(monkeypatch):
    monkeypatch.delenv(
        catalogue.ENV_VAR, raising=False
    )  # a developer's own folders must not leak into tests


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ------------------------------------------------------------------ loading and rendering


def test_load_merges_include_and_exposes_fields():
    t = load_task_file(SENT)
    assert (t.name, t.task_type, t.version, t.parse, t.eval_mode) == (
        "toy_sentiment",
        "classification",
        1,
        "label",
        "generate",
    )
    assert t.metric == ["accuracy", "macro_f1"]  # from the included _shared snippet
    assert t.fields["id"].required is False and t.fields["text"].type == "str"
    assert [v.id for v in t.train_variants()] == ["direct", "review"]
    assert t.variant("heldout_q").heldout
    assert t.files[1].name == "label_task.yaml"
    assert t.samples == (Path(__file__).resolve().parents[1] / "tests/fixtures/data/toy_sentiment")
    with pytest.raises(TemplateError, match="did you mean 'review'"):
        t.variant("reviw")


def test_include_deep_merge_this_file_wins(tmp_path):
    write(
        tmp_path / "_base.yaml",
        """\
        task_type: classification
        version: 1
        source: {hub: base/hub, labels: {"0": "no", "1": "yes"}}
        answer_choices: ["no", "yes"]
        metric: [accuracy, macro_f1]
        parse: label
        """,
    )
    f = write(
        tmp_path / "child.yaml",
        """\
        name: child
        include: _base.yaml
        version: 3
        source: {hub: child/hub}
        metric: [macro_f1]
        fields: {text: str, label: label}
        variants: [{id: a, input: "{{ text }}", output: "{{ label }}"}]
        """,
    )
    t = load_task_file(f)
    assert t.version == 3 and t.metric == ["macro_f1"]  # scalars and lists: this file wins
    assert t.source == {"hub": "child/hub", "labels": {"0": "no", "1": "yes"}}  # mappings merge
    assert t.answer_choices == ["no", "yes"]


def test_render_record_meta_and_stripping():
    t = load_task_file(SENT)
    rec = t.render(
        {"text": "nice \n ", "label": "positive", "id": None}, "review", row_id=7, split="train"
    )
    assert rec.task == "toy_sentiment" and rec.input == "Review: nice" and rec.output == "positive"
    assert (
        t.render(
            {"text": "  nice  ", "label": "negative", "id": None}, "direct", row_id=1, split="x"
        ).input
        == "nice"
    )
    assert rec.instruction == "Read the review and answer with one word:\nnegative, positive."
    assert rec.meta == {"variant": "review", "row_id": "7", "split": "train", "template_version": 1}
    prompt_only = t.render(
        {"text": "x", "label": None, "id": None},
        "direct",
        row_id=0,
        split="test",
        with_output=False,
    )
    assert prompt_only.output == "" and prompt_only.input == "x"


def test_round_robin_cycles_rows_and_epochs_never_heldout():
    t = load_task_file(SENT)
    row = {"text": "x", "label": "negative", "id": None}
    ids = [t.render(row, row_id=i, split="train").meta["variant"] for i in range(4)]
    assert ids == ["direct", "review", "direct", "review"]
    assert t.render(row, row_id=0, split="train", epoch=1).meta["variant"] == "review"


def test_random_policy_is_seeded_by_row_and_epoch():
    t = load_task_file(GOOD / "toy_ner.yaml")
    assert t.variant_policy == "random"
    picks = {(r, e): t.pick_variant(str(r), e).id for r in range(50) for e in range(3)}
    assert picks == {
        (r, e): t.pick_variant(str(r), e).id for r in range(50) for e in range(3)
    }  # deterministic
    assert set(Counter(picks.values())) == {"list", "tagged"}
    assert any(picks[(r, 0)] != picks[(r, 1)] for r in range(50))  # epochs re-draw


def test_ner_linearize_filter_and_list_label_mapping():
    t = load_task_file(GOOD / "toy_ner.yaml")
    rows = sources.load_rows(t, None, "train")
    assert rows[0]["ner_tags"] == [
        "B-PER",
        "I-PER",
        "O",
        "B-LOC",
        "I-LOC",
        "O",
    ]  # ints mapped element-wise
    assert rows[2]["ner_tags"][0] == "B-PER"  # names pass through
    outs = {
        t.render(rows[i], v, row_id=i, split="train").output
        for i in range(len(rows))
        for v in ("list", "tagged")
    }
    assert outs == {"PER: Peter Blackburn | LOC: New York", "none", "PER: Anna | LOC: Paris"}
    parsed = t.parse_output("PER: Anna | LOC: Paris", tokens=rows[2]["tokens"])
    assert parsed.valid and parsed.value == ["B-PER", "O", "O", "B-LOC"]


NER_TAGS_TEMPLATE = """\
    name: tags
    task_type: ner
    version: 1
    source:
      labels: {labels}
    fields:
      tokens: list[str]
      ner_tags: list[label]
    label_field: ner_tags
    {extra}
    variants:
      - id: v
        input: "{{{{ tokens | join(' ') }}}}"
        output: "{{{{ tokens | ner_linearize(ner_tags) }}}}"
    metric: span_f1
    parse: entities
    """


@pytest.mark.parametrize(
    "labels, extra, raw, tags, types",
    [
        # whole tags only; O is not mapped and passes through
        (
            "{B-PER: B-person, I-PER: I-person}",
            "",
            ["B-PER", "I-PER", "O"],
            ["B-person", "I-person", "O"],
            ["person"],
        ),
        # a type rename: B-/I- follow, O passes through
        (
            '{PER: person, "7": B-person}',
            "",
            ["B-PER", "I-PER", "O", 7],
            ["B-person", "I-person", "O", "B-person"],
            ["person"],
        ),
        # declared types: unmapped tags of declared types pass through
        (
            "{WORK: creative-work}",
            "entity_types: [creative-work, Product Name]",
            ["B-WORK", "B-Product Name", "I-Product Name", "O"],
            ["B-creative-work", "B-Product Name", "I-Product Name", "O"],
            ["creative-work", "Product Name"],
        ),
    ],
)
def test_tag_list_label_maps_need_not_map_every_tag(tmp_path, labels, extra, raw, tags, types):
    f = write(tmp_path / "tags.yaml", NER_TAGS_TEMPLATE.format(labels=labels, extra=extra))
    t = load_task_file(f)
    assert t.entity_types == types and t.label_set()[0] == "O"
    write(tmp_path / "d" / "train.jsonl", json.dumps({"tokens": ["w"] * len(raw), "ner_tags": raw}))
    rows = sources.load_rows(t, SourceConfig(path=str(tmp_path / "d")), "train", bad_rows="fail")
    assert rows[0]["ner_tags"] == tags


def test_tag_outside_the_task_types_is_a_bad_row_with_a_fix(tmp_path):
    f = write(
        tmp_path / "tags.yaml",
        NER_TAGS_TEMPLATE.format(labels="{PER: person}", extra="entity_types: [person]"),
    )
    t = load_task_file(f)
    write(
        tmp_path / "d" / "train.jsonl",
        '{"tokens": ["a", "b"], "ner_tags": ["B-PER", "B-ORG"]}\n'
        '{"tokens": ["a"], "ner_tags": [3]}\n'
        '{"tokens": ["a"], "ner_tags": ["B-person"]}\n',
    )
    rows = sources.load_rows(t, SourceConfig(path=str(tmp_path / "d")), "train")
    assert len(rows) == 1 and rows.skipped == 2 and rows.label_skipped == 2 and not rows.all_bad
    msgs = [p.format() for p in rows.problems]
    assert "tag 'B-ORG' in 'ner_tags' is not a tag of this task (O, B-person, I-person)" in msgs[0]
    assert "declare 'ORG' in entity_types, or rename it with labels: {ORG: <type>}" in msgs[0]
    assert "tag 3 in 'ner_tags' is not a tag" in msgs[1] and 'labels: {"3": <tag>}' in msgs[1]


def test_ner_tags_without_known_types_must_still_be_tags(tmp_path):
    f = write(tmp_path / "tags.yaml", NER_TAGS_TEMPLATE.format(labels="{}", extra=""))
    t = load_task_file(f)
    assert t.entity_types is None and t.label_set() is None
    write(
        tmp_path / "d" / "train.jsonl",
        '{"tokens": ["a", "b"], "ner_tags": ["B-any type", "O"]}\n'
        '{"tokens": ["a"], "ner_tags": ["B-a:b"]}\n'
        '{"tokens": ["a"], "ner_tags": ["PER"]}\n',
    )
    rows = sources.load_rows(t, SourceConfig(path=str(tmp_path / "d")), "train")
    assert len(rows) == 1 and rows.skipped == 2
    assert "it contains ':'" in rows.problems[0].message
    assert "tag 'PER' in 'ner_tags' is not a tag of this task" in rows.problems[1].message
    assert t.parse_output("any type: a", tokens=["a", "b"]).value == ["B-any type", "O"]


def test_preview_refuses_a_map_that_fits_no_row(tmp_path, capsys):
    broken = Path(__file__).resolve().parent / "fixtures" / "broken"
    rc = main(["preview", str(broken / "tag_map_all_bad.yaml")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err and "no rows to show" not in err
    assert f"{broken / 'tag_map_all_bad.yaml'}:10: all 2 rows of " in err
    # the same map given in a run config is reported at the config's line
    cfg = write(
        tmp_path / "run.yaml",
        f"""\
        template_dirs: [{broken}]
        tasks:
          - template: tag_map_all_bad
            source:
              path: {broken / "data" / "tag_map_all_bad"}
              labels: {{"1": B-person}}
        """,
    )
    assert main(["preview", "tag_map_all_bad", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:6: all 2 rows of " in err and "are bad with this labels map" in err
    for verb in (["mix", "--config", str(cfg)], ["validate", "--config", str(cfg)]):
        assert main(verb) == 2  # every verb blames the same line: the map the run config gives
        err = capsys.readouterr().err
        assert f"{cfg}:6: all 2 rows of " in err, (verb, err)
    # and on the command line
    src = str(broken / "data" / "tag_map_all_bad")
    assert (
        main(
            [
                "preview",
                str(broken / "tag_map_all_bad.yaml"),
                "--source",
                src,
                "--labels",
                "1=B-person",
            ]
        )
        == 2
    )
    assert "<cli> --labels: all 2 rows of " in capsys.readouterr().err


# ------------------------------------------------------------------ sources


def test_bundled_samples_are_mapped_and_validated():
    t = load_task_file(SENT)
    rows = sources.load_rows(t, None, "train")
    assert len(rows) == 4 and rows.skipped == 0
    assert rows[0] == {"text": "a wonderful, warm film", "label": "positive", "id": "t1"}
    assert rows[3]["id"] is None  # optional field absent -> None, so templates can test it
    assert rows.location(1) == (str(t.samples / "train.jsonl"), 2)
    assert rows.summary() == "toy_sentiment/train: 0 bad rows skipped"
    recs = list(catalogue.task_records(t, rows, "train"))
    assert [r.meta["row_id"] for r in recs] == ["0", "1", "2", "3"]
    assert [r.output for r in recs] == ["positive", "negative", "positive", "negative"]
    assert len(sources.load_rows(t, None, "train", limit=2)) == 2


def test_override_inherits_template_columns_and_labels(tmp_path):
    t = load_task_file(SENT)
    write(tmp_path / "validation.csv", "sentence,label\ngreat,1\nawful,0\n")
    rows = sources.load_rows(t, SourceConfig(path=str(tmp_path)), "validation")
    assert [r["text"] for r in rows] == ["great", "awful"] and [r["label"] for r in rows] == [
        "positive",
        "negative",
    ]
    # An override's own maps replace the template's.
    write(tmp_path / "train.jsonl", '{"body": "meh", "y": "b"}\n')
    rows = sources.load_rows(
        t,
        SourceConfig(
            path=str(tmp_path),
            columns={"body": "text", "y": "label"},
            labels={"a": "positive", "b": "negative"},
        ),
        "train",
    )
    assert rows[0] == {"text": "meh", "label": "negative", "id": None}


def test_hub_source_offline_gives_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError(
            "Couldn't reach 'example/toy-sentiment' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    t = load_task_file(SENT)
    with pytest.raises(DataError) as ei:
        sources.load_rows(
            t, None, "test"
        )  # the samples have no test split -> the template's hub source
    msg = ei.value.problems[0].format()
    assert "cannot load hub dataset 'example/toy-sentiment', split 'test'" in msg
    assert "source: {path: DIR}" in msg and "--source DIR" in msg


def test_missing_path_and_fail_policy_limit(tmp_path):
    t = load_task_file(SENT)
    with pytest.raises(DataError, match="data file or folder not found"):
        sources.load_rows(t, SourceConfig(path=str(tmp_path / "nope.jsonl")), "train")
    lines = [json.dumps({"sentence": f"s{i}", "label": "meh"}) for i in range(30)]
    write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as ei:
        sources.load_rows(t, SourceConfig(path=str(tmp_path)), "train", bad_rows="fail")
    probs = ei.value.problems  # one cause on every row: three of its lines, the rest counted
    assert [p.line for p in probs[:4]] == [1, 2, 3, 4] and "30 bad row(s)" in probs[-1].message
    assert probs[3].message.startswith("the same on 27 more line(s) (lines 4-30): label 'meh'")
    lines = [json.dumps({"sentence": f"s{i}", "label": f"meh{i}"}) for i in range(30)]
    write(tmp_path / "train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as ei:  # 30 different problems: the first MAX_SHOWN listed
        sources.load_rows(t, SourceConfig(path=str(tmp_path)), "train", bad_rows="fail")
    probs = ei.value.problems
    assert len(probs) == sources.MAX_SHOWN + 1 and "30 bad row(s)" in probs[-1].message
    assert "10 more problems not shown" in probs[-1].message


# ------------------------------------------------------------------ catalogue


def test_user_template_picked_up_via_env_var(tmp_path, monkeypatch, capsys):
    user = tmp_path / "my_templates"
    write(
        user / "my_task.yaml",
        """\
        name: my_task
        task_type: generation
        version: 1
        fields: {question: str, answer: str}
        variants: [{id: q, input: "Q: {{ question }}", output: "{{ answer }}"}]
        metric: [rouge]
        parse: text
        """,
    )
    write(user / "_snippet.yaml", "metric: [rouge]\n")
    assert "my_task" not in catalogue.find_task_files()
    monkeypatch.setenv(catalogue.ENV_VAR, str(user))
    cat = catalogue.find_task_files()
    assert cat["my_task"] == user / "my_task.yaml" and "_snippet" not in cat
    assert catalogue.load_task("my_task").name == "my_task"
    with pytest.raises(TemplateError, match="did you mean 'my_task'"):
        catalogue.load_task("my_tsk")
    write(tmp_path / "d" / "train.jsonl", '{"question": "2+2?", "answer": "4"}\n')
    assert main(["preview", "my_task", "--source", str(tmp_path / "d")]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out)["input"] == "Q: 2+2?"
    # validate trial-renders real rows: without samples or a source there are none to render on
    assert main(["validate"]) == 2  # default: shipped + user folders
    err = capsys.readouterr().err
    assert f"{user / 'my_task.yaml'}:1: no rows to trial-render 'my_task' on" in err
    assert main(["validate", "--no-trial"]) == 0
    capsys.readouterr()
    text = (user / "my_task.yaml").read_text(encoding="utf-8")
    (user / "my_task.yaml").write_text(text + "source: {path: ../d}\n", encoding="utf-8")
    assert main(["validate"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"validate: {len(_shipped()) + 1} template(s) OK" in err
    assert "rendered on bundled samples: ner_conll2003," in err
    assert "rendered on own source: my_task" in err
    assert main(["validate", "my_task"]) == 0
    assert main(["validate", "my_tsk"]) == 2
    assert (
        "my_tsk: no such template file, folder or task name (did you mean 'my_task'?)"
        in capsys.readouterr().err
    )
    assert main(["validate", "my_task", "train.steps=3"]) == 2  # an override is not a template
    assert "validate takes templates, not key=value overrides" in capsys.readouterr().err


def test_name_clash_between_folders(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d).mkdir()
        (d / "toy_sentiment.yaml").write_text(
            SENT.read_text(encoding="utf-8").replace(
                "include: _shared/label_task.yaml",
                f"include: {GOOD / '_shared' / 'label_task.yaml'}",
            ),
            encoding="utf-8",
        )
    monkeypatch.setenv(catalogue.ENV_VAR, f"{a}{__import__('os').pathsep}{b}")
    with pytest.raises(TemplateError, match="clashes with"):
        catalogue.load_task("toy_sentiment")
    clash = f"{b / 'toy_sentiment.yaml'}:1: task name 'toy_sentiment' clashes with {a / 'toy_sentiment.yaml'}"
    assert main(["validate"]) == 2
    assert clash in capsys.readouterr().err
    assert main(["validate", "--no-trial", "toy_sentiment"]) == 2  # named alone, too
    assert clash in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tasks:\n  - template: toy_sentiment\n", encoding="utf-8")
    assert main(["mix", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.count(clash) == 1  # once, though the run's task meets it too


def test_check_config_reports_with_config_lines(tmp_path):
    write(tmp_path / "data" / "train.jsonl", '{"sentence": "x", "label": 1}\n')
    cfg_file = write(
        tmp_path / "run.yaml",
        f"""\
        template_dirs: [{GOOD}]
        tasks:
          - template: toy_sentimnt
          - template: toy_sentiment
            name: s2
            eval_mode: rank
            source: {{path: data, columns: {{sentence: txt}}, labels: {{"1": good}}}}
          - template: toy_ner
            name: n
            eval_mode: rank
            source: {{path: missing_dir}}
        """,
    )
    probs = [p.format() for p in catalogue.check_config(load_config(cfg_file))]
    assert (
        f"{cfg_file}:3: tasks[0].template: unknown task 'toy_sentimnt' (did you mean 'toy_sentiment'?"
        in probs[0]
    )
    text = "\n".join(probs)
    assert f"{cfg_file}:7: tasks[1].source.columns: 'txt' is not a field of 'toy_sentiment'" in text
    assert f"{cfg_file}:7: tasks[1].source.labels: 'good' is not a label of 'toy_sentiment'" in text
    assert (
        f"{cfg_file}:10: tasks[2].eval_mode: rank needs a label task (parse: label, answer_choices)"
        in text
    )
    assert f"{cfg_file}:11: tasks[2].source.path: not found: missing_dir" in text
    assert len(probs) == 5


def test_check_config_tag_maps_name_tags_or_types(tmp_path):
    cfg_file = write(
        tmp_path / "run.yaml",
        f"""\
        template_dirs: [{GOOD}]
        tasks:
          - template: toy_ner
            source: {{path: {GOOD}, labels: {{PERSON: PER, "9": I-LOC}}}}
          - template: toy_ner
            name: n2
            source: {{path: {GOOD}, labels: {{PERSON: person, "9": B-ORG, "8": "B-a:b"}}}}
        """,
    )
    probs = [p.format() for p in catalogue.check_config(load_config(cfg_file))]
    assert len(probs) == 3, probs
    assert probs[0].startswith(f"{cfg_file}:7: tasks[1].source.labels: 'person' is not a tag or ")
    assert "(expected one of: B-LOC, B-PER, I-LOC, I-PER, LOC, O, PER)" in probs[0]
    assert f"{cfg_file}:7: tasks[1].source.labels: 'B-ORG' is not a tag or entity type" in probs[1]
    assert "'B-a:b' is not a tag or entity type of 'toy_ner': it contains ':'" in probs[2]


# ------------------------------------------------------------------ CLI


def test_preview_stdout_is_only_json_lines(capsys):
    assert main(["preview", str(SENT), "-n", "3", "--variant", "heldout_q"]) == 0
    out, err = capsys.readouterr()
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert len(recs) == 3 and {r["meta"]["variant"] for r in recs} == {"heldout_q"}
    assert recs[0]["input"] == "A WONDERFUL, WARM FILM"
    # the sample has more rows: the count says how many were looked at
    assert err.strip() == (
        "toy_sentiment/train: 0 bad rows skipped among the 3 rows read (reading stopped at the limit)"
    )


def test_preview_user_errors_exit_2(capsys, tmp_path):
    for argv, frag in [
        (["preview", str(SENT), "--variant", "revew"], "did you mean 'review'"),
        (["preview", str(SENT), "--columns", "a=b"], "need --source"),
        (["preview", str(SENT), "--source", "./nope"], "--source: no such file or folder"),
        (["preview", str(SENT), "--source", str(GOOD), "--labels", "0"], "'0' is not KEY=VALUE"),
        (["preview", "toy_sentimnt"], "unknown task 'toy_sentimnt'"),
    ]:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and frag in err and "Traceback" not in err


def test_preview_with_run_config_source(tmp_path, capsys):
    write(tmp_path / "d" / "validation.jsonl", '{"sentence": "from the config", "label": 0}\n')
    cfg = write(
        tmp_path / "run.yaml",
        f"""\
        template_dirs: [{GOOD}]
        tasks: [{{template: toy_sentiment, name: sent, source: {{path: d}}}}]
        """,
    )
    assert main(["preview", "sent", "--config", str(cfg), "--split", "validation"]) == 0
    out, _ = capsys.readouterr()
    rec = json.loads(out)
    assert rec["input"] == "from the config" and rec["task"] == "sent"


# ------------------------------------------------------------------ shipped templates and real data


def _shipped() -> list[str]:
    return sorted(p.stem for p in catalogue.SHIPPED_DIR.glob("[!_]*.yaml"))


def test_shipped_templates_validate(capsys):
    if not _shipped():
        pytest.skip("no shipped templates yet")
    rc = main(["validate"])
    err = capsys.readouterr().err
    assert rc == 0, err


@pytest.mark.parametrize("name", sorted(REAL))
def test_shipped_template_renders_real_slice(name, real_data_dir, capsys):
    if name not in _shipped():
        pytest.skip(f"{name}.yaml not shipped")
    folder, split = REAL[name]
    t = catalogue.load_task(name)
    rows = sources.load_rows(
        t, SourceConfig(path=str(real_data_dir / folder)), split, bad_rows="fail", limit=40
    )
    assert len(rows) == 40
    for i in range(len(rows)):
        for v in t.variants:
            rec = t.render(rows[i], v, row_id=i, split=split)
            assert rec.input and rec.output
            if t.is_label_task:
                assert rec.output in t.answer_choices
    assert (
        main(
            ["preview", name, "--source", str(real_data_dir / folder), "--split", split, "-n", "2"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and f"{name}/{split}: 0 bad rows skipped" in err
