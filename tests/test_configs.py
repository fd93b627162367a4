"""Every shipped run config and accelerate config is valid (no model loading, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from t2t_mtl.core.config import load_config
from t2t_mtl.tasks import catalogue

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
ACCEL_CONFIGS = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name repository paths (data, ../shared) from the project root
    cfg = load_config(path)
    problems = catalogue.check_config(cfg)
    if (
        any("not found: ../shared" in p.message for p in problems)
        and not (REPO.parent / "shared").is_dir()
    ):
        pytest.skip("config reads the shared real-data slices, absent here")
    assert problems == [], "\n".join(p.format() for p in problems)
    assert cfg.stage_list() and all(s.steps > 0 for s in cfg.stage_list())


def test_training_configs_exist_and_default_covers_every_shipped_task():
    names = {p.name for p in RUN_CONFIGS}
    assert {"default.yaml", "qlora_qwen.yaml", "t5.yaml", "tiny_cpu.yaml"} <= names
    default = load_config(REPO / "launch" / "configs" / "default.yaml")
    shipped = set(catalogue.find_task_files())
    assert {t.template for t in default.tasks} == shipped
    assert default.model.name.startswith("embedded:") and all(
        t.source is None for t in default.tasks
    )
    qwen = load_config(REPO / "launch" / "configs" / "qlora_qwen.yaml")
    assert qwen.adapter.method == "qlora" and "/" in qwen.model.name
    t5 = load_config(REPO / "launch" / "configs" / "t5.yaml")
    assert t5.model.family == "seq2seq" and "t5" in t5.model.name


@pytest.mark.parametrize("path", ACCEL_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    cfg = load_config_from_file(str(path))  # accelerate's own parser (rejects unknown keys)
    assert cfg.distributed_type == raw["distributed_type"]
    if raw["distributed_type"] == "DEEPSPEED":
        assert (
            raw["deepspeed_config"]["gradient_accumulation_steps"] == "auto"
        )  # taken from train.grad_accum


def test_all_accelerate_setups_are_shipped():
    assert {p.stem for p in ACCEL_CONFIGS} == {
        "single_gpu",
        "ddp",
        "fsdp",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "cpu_ddp",
        "cpu_fsdp",
    }


def test_the_documented_words_work_unquoted_in_a_file_and_as_overrides(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans: `packing: off` in a file or `train.mixed_precision=no`
    on the command line must still mean the documented choice, not fail as "invalid value False"."""
    from t2t_mtl.core.config import load_config

    base = REPO / "launch" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(base, ["train.packing=off", "train.mixed_precision=no"])
    assert (cfg.train.packing, cfg.train.mixed_precision) == ("off", "no")
    assert load_config(base, ["train.packing=on"]).train.packing == "on"
    text = base.read_text(encoding="utf-8").replace(
        "train:\n", "train:\n  packing: off\n  mixed_precision: no\n", 1
    )
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.packing, cfg.train.mixed_precision) == ("off", "no")


def _problems(tmp_path, text: str, overrides: list[str] | None = None) -> list[str]:
    from t2t_mtl.core.errors import ConfigError

    (tmp_path / "run.yaml").write_text(text, encoding="utf-8")
    try:
        load_config(tmp_path / "run.yaml", overrides)
    except ConfigError as e:
        return [p.format() for p in e.problems]
    return []


def test_ranges_and_contradictions_are_refused_at_their_own_key(tmp_path):
    """Values no run can use are refused before any data is read, each at its key's line."""
    text = """\
tasks:
  - {template: sentiment_sst2, floor: 0.6}
  - {template: qa_squad, floor: 0.7}
adapter:
  alpha: -2
  layers: [10, 29]
stages:
  - {name: one, tasks: [sentiment_sst2, qa_squad], steps: 5}
  - {name: two, tasks: [qa_squad], steps: 5, train_layers: [0, 5]}
train:
  warmup_steps: -1
  resume: sometimes
eval:
  limit: -1
  batch_size: 0
"""
    got = "\n".join(_problems(tmp_path, text))
    f = tmp_path / "run.yaml"
    for line, fragment in [
        (5, "adapter.alpha: must be > 0"),
        (8, "stages[0].tasks: stage 'one': floors of sentiment_sst2, qa_squad sum to 1.3"),
        (9, "stages[1].train_layers: [0, 5] covers none of adapter.layers [10, 29]"),
        (11, "train.warmup_steps: must be >= 0"),
        (12, "train.resume: 'sometimes' is neither auto, never nor a checkpoint folder"),
        (14, "eval.limit: must be >= 0 (0 scores every row)"),
        (15, "eval.batch_size: must be > 0"),
    ]:
        assert f"{f}:{line}: {fragment}" in got, (fragment, got)
    assert not _problems(tmp_path, "tasks: [sentiment_sst2]\n")


def test_mixture_shares_are_checked_per_stage_and_name_the_override(tmp_path):
    text = "tasks:\n  - {template: sentiment_sst2, ceiling: 0.3}\n  - {template: qa_squad, weight: 0.5}\n"
    assert _problems(tmp_path, text) == []
    got = _problems(tmp_path, text, ["tasks.1.ceiling=0.2"])
    assert any("the ceilings of its tasks sum to 0.5, less than the whole" in p for p in got), got
    got = _problems(tmp_path, text, ["tasks.1.weight=1.2"])
    assert any("the tasks with a weight take 1.2 of the mixture" in p for p in got), got
    every = (
        "tasks:\n  - {template: sentiment_sst2, weight: 0}\n  - {template: qa_squad, weight: 0}\n"
    )
    assert any("every task's weight is 0" in p for p in _problems(tmp_path, every))
    # with replay joining a later stage, its member fills what the ceilings leave
    staged = text.replace("ceiling: 0.3", "ceiling: 0.1") + (
        "stages:\n  - {name: a, tasks: [qa_squad], steps: 2}\n"
        "  - {name: b, tasks: [sentiment_sst2], steps: 2}\nreplay: {enabled: true}\n"
    )
    assert _problems(tmp_path, staged) == []


def test_config_shapes_users_write(tmp_path):
    """A template name alone is a task; a template given as a config, an empty file, a list item
    that is not there and an unquoted yes each get one clear line."""
    cfg = _problems(tmp_path, "tasks: [sentiment_sst2, qa_squad]\n")
    assert cfg == []
    assert [t.template for t in load_config(tmp_path / "run.yaml").tasks] == [
        "sentiment_sst2",
        "qa_squad",
    ]
    tpl = REPO / "task_templates" / "sentiment_sst2.yaml"
    from t2t_mtl.core.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(tpl)
    assert len(e.value.problems) == 1
    assert (
        "this is a task template (it has variants:), not a run config"
        in e.value.problems[0].message
    )
    assert _problems(tmp_path, "") == [f"{tmp_path / 'run.yaml'}:1: the run config is empty "
                                       "(start from launch/configs/default.yaml)"]  # fmt: skip
    staged = "tasks: [sentiment_sst2]\nstages: [{name: a, tasks: [sentiment_sst2], steps: 2}]\n"
    got = _problems(tmp_path, staged, ["stages.5.steps=3", "train.mixed_precision=yes"])
    assert "<override>: stages.5.steps=3: no list item '5'" in got[0]
    assert "train.mixed_precision=yes" in got[1] and "YAML reads an unquoted" in got[1]


def test_settings_that_do_nothing_get_a_note_not_an_error(tmp_path):
    from t2t_mtl.core.config import config_notes

    (tmp_path / "run.yaml").write_text(
        "tasks: [sentiment_sst2, qa_squad]\nreplay: {enabled: true}\n", encoding="utf-8"
    )
    cfg = load_config(tmp_path / "run.yaml")
    assert config_notes(cfg) == [
        "note: replay.enabled does nothing with one stage (replay mixes earlier stages' records "
        "into later ones)"
    ]
    staged = load_config(
        tmp_path / "run.yaml",
        ["stages=[{name: a, tasks: [qa_squad], steps: 2}]", "replay.enabled=false"],
    )
    assert config_notes(staged) == [
        "note: task 'sentiment_sst2' is in no stage: evaluated, never trained"
    ]


def test_a_template_given_by_path_is_named_by_its_file(tmp_path):
    """`template: my_tasks/x.yaml` names the task by the `name:` the file declares (logs, metrics
    and stages say `tickets`); a stage may still list it by that path; two files declaring one
    name clash like two tasks named alike."""
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    src = (REPO / "task_templates" / "sentiment_sst2.yaml").read_text(encoding="utf-8")
    (folder / "a.yaml").write_text(src.replace("name: sentiment_sst2", "name: tickets"), "utf-8")
    (folder / "b.yaml").write_text(src, encoding="utf-8")
    text = (
        "tasks: [{template: my_tasks/a.yaml}, {template: my_tasks/b.yaml, name: other}]\n"
        "stages: [{name: one, tasks: [my_tasks/a.yaml], steps: 2},"
        " {name: two, tasks: [tickets, other], steps: 2}]\n"
    )
    assert _problems(tmp_path, text) == []
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.task_names() == ["tickets", "other"]
    assert [s.tasks for s in cfg.stages] == [["tickets"], ["tickets", "other"]]
    clash = "tasks: [{template: my_tasks/b.yaml}, {template: sentiment_sst2}]\n"
    got = _problems(tmp_path, clash)
    assert any("task name 'sentiment_sst2' used twice" in p for p in got), got
