"""Safety holes closed: `export --force` replaces only an earlier export; names that become path
components are single safe file names; a run folder cannot switch on remote model code without
`--trust-remote-code`; a run resumes only its own checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from t2t_mtl.cli.main import main
from t2t_mtl.core.config import load_config, name_problem
from t2t_mtl.core.errors import ConfigError, T2TError, TemplateError
from t2t_mtl.tasks.task import load_task_file
from t2t_mtl.training import checkpointing

REPO = Path(__file__).resolve().parents[1]
BAD_NAMES = [
    "",
    ".",
    "..",
    "../../../tmp/x",
    "a/b",
    "a\\b",
    "/abs",
    "-rf",
    "x\x00y",
    "tab\there",
    "new\nline",
    "x" * 101,
    "trailing.",
    "trailing ",
    " leading",
    "a:b",
    "what?",
]
GOOD_NAMES = ["main", "stage 1", "s1_b-2.v3", "_private", "étape", "x" * 100, "2024"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def _fake_run(root: Path, *, remote: bool = False) -> Path:
    """A run folder with a valid config and final-bundle manifest but no weights: enough for
    everything a verb checks before it loads the model."""
    run = root / "fake-run"
    model = {"name": "org/remote-model" if remote else "org/plain-model"}
    if remote:
        model["trust_remote_code"] = True
    cfg = {
        "run_name": "fake",
        "output_dir": str(run),
        "model": model,
        "tasks": [{"template": "sentiment_sst2"}],
    }
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    manifest = {
        "model": {**model, "family": "auto", "dtype": "auto"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "family": "causal",
        "prompt_format": {"kind": "plain"},
        "bundle": {"kind": "adapter", "format": 1},
    }
    (run / "adapter" / "t2t_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return run


# ------------------------------------------------------------------ 1. export --force


def test_export_force_refuses_a_folder_that_is_not_an_earlier_export(tmp_path, capsys):
    run = _fake_run(tmp_path)
    home = tmp_path / "home"  # what `--out ~ --force` would have deleted
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    (home / "notes.txt").write_text("keep me")
    before = _snapshot(home)
    for force in ([], ["--force"]):
        rc = main(["export", "--run", str(run), "--out", str(home), *force])
        assert rc == 2
        err = capsys.readouterr().err
        assert str(home) in err and "choose an empty or new folder" in err
        if force:
            assert "not an earlier export" in err and "t2t_export.json" in err
        else:
            assert "not empty" in err
    assert _snapshot(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-run", "home"]  # no temp siblings
    # A file or a symbolic link is never replaced either.
    (tmp_path / "file").write_text("x")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "file"), "--force"]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
    os.symlink(home, tmp_path / "link")
    (home / "t2t_export.json").write_text("{}")  # even when the target looks like an export
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "link"), "--force"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert (home / "notes.txt").read_text() == "keep me"


@pytest.fixture(scope="module")
def trained_run(tiny_models_root, tiny_causal_dir, tmp_path_factory):
    from tiny_runs import tiny_staged_run

    src = tiny_staged_run(tiny_models_root / "runs", tiny_causal_dir)
    dst = tmp_path_factory.mktemp("safety") / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    return dst


@pytest.mark.usefixtures("one_thread")
def test_export_twice_with_force_replaces_the_earlier_export(trained_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 0
    marker = json.loads((out / "t2t_export.json").read_text())
    assert (
        marker["run"] == str(trained_run.resolve()) and marker["time"] and marker["t2t_mtl_version"]
    )
    (out / "stale.txt").write_text("from the first export")
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 2  # no --force
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "--run", str(trained_run), "--out", str(out), "--force"]) == 0
    assert (out / "t2t_export.json").is_file() and (out / "config.json").is_file()
    assert not (out / "stale.txt").exists()  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temp or old folders


@pytest.mark.usefixtures("one_thread")
def test_a_failed_export_leaves_the_earlier_one_whole(trained_run, tmp_path, monkeypatch):
    from t2t_mtl.inference import predictor

    out = tmp_path / "exported"
    assert main(["export", "--run", str(trained_run), "--out", str(out)]) == 0
    before = _snapshot(out)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:  # the new export cannot move in
            raise OSError("simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        predictor.export(trained_run, out, force=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


# ------------------------------------------------------------------ 2. names as path components


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_unsafe_names_are_refused(name):
    assert name_problem(name)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_safe_names_pass(name):
    assert name_problem(name) == ""


def test_config_reports_every_unsafe_name_at_its_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "\n".join(
            [
                "run_name: ../escape",  # 1
                "tasks:",  # 2
                "  - template: sentiment_sst2",  # 3
                "    name: 'a/b'",  # 4
                "  - template: qa_squad",  # 5
                "stages:",  # 6
                "  - name: ../../../tmp/x",  # 7
                "    tasks: [a/b]",  # 8
                "    steps: 2",  # 9
                "  - name: '..'",  # 10
                "    tasks: [qa_squad]",  # 11
                "    steps: 2",  # 12
                "  - name: ok",  # 13
                "    tasks: [qa_squad]",  # 14
                "    steps: 2",  # 15
                "  - name: ok",  # 16
                "    tasks: [qa_squad]",  # 17
                "    steps: 2",  # 18
                "eval:",  # 19
                "  split: '-rf'",  # 20
            ]
        )
        + "\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    got = {(p.line, p.message.split(":")[0]) for p in e.value.problems if "safe name" in p.message}
    assert got == {
        (1, "run_name"),
        (4, "tasks[0].name"),
        (7, "stages[0].name"),
        (10, "stages[1].name"),
        (20, "eval.split"),
    }
    assert all(p.file == str(cfg) for p in e.value.problems)
    assert all("letters, digits" in p.hint for p in e.value.problems if "safe name" in p.message)
    assert any(p.line == 16 and "used twice" in p.message for p in e.value.problems)


def test_an_unsafe_name_from_an_override_names_the_override():
    data = {"tasks": [{"template": "sentiment_sst2"}]}
    overrides = [
        "stages=[{name: ../x, tasks: [sentiment_sst2], steps: 1}]",
        "run_name=a/b",
        "eval.split=..",
    ]
    with pytest.raises(ConfigError) as e:
        load_config(data=data, overrides=overrides)
    lines = [p.format() for p in e.value.problems]
    assert len(lines) == 3 and all(x.startswith("<override>: ") for x in lines)
    for ov, key in zip(overrides, ("stages[0].name", "run_name", "eval.split")):
        assert any(f"{ov}: {key}: " in x and "not a safe name" in x for x in lines), lines


def test_template_variant_ids_must_be_safe_names(tmp_path):
    src = (REPO / "tests/fixtures/training/templates/toy_copy.yaml").read_text()
    assert "  - id: copy\n" in src
    for bad in ("../up", "a/b", "-opt"):
        f = tmp_path / "toy_copy.yaml"
        f.write_text(src.replace("  - id: copy\n", f"  - id: '{bad}'\n"))
        with pytest.raises(TemplateError) as e:
            load_task_file(f)
        [p] = e.value.problems
        assert p.file == str(f) and p.line == src.splitlines().index("  - id: copy") + 1
        assert f"variant id '{bad}' is not a safe name" in p.message


@pytest.mark.parametrize("bad", ["../x", "../../outside", "a/b", "..", "-x", "x\x01"])
def test_eval_name_and_split_must_be_safe_names(tmp_path, capsys, bad):
    run = _fake_run(tmp_path)
    before = _snapshot(tmp_path)
    assert main(["eval", "--run", str(run), f"--name={bad}"]) == 2  # "=": "-x" is not an option
    err = capsys.readouterr().err
    assert f"--name: {bad!r} is not a safe name" in err and "letters, digits" in err
    assert main(["eval", "--run", str(run), f"--split={bad}", "--name", "fine"]) == 2
    assert f"--split: {bad!r} is not a safe name" in capsys.readouterr().err
    assert main(["compare", str(run), f"--name={bad}"]) == 2
    assert "--name" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    # The Python API checks the results name too (nothing is loaded or written first).
    from t2t_mtl.evaluation.run_eval import evaluate_run

    with pytest.raises(ConfigError, match="not a safe name"):
        evaluate_run(run, name=bad)
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------ 3. remote code needs consent


class _Loaded(Exception):
    """Raised by the patched loader: carries the ModelConfig it was given."""


@pytest.fixture
def capture_loader(monkeypatch):
    from t2t_mtl.model import loading

    def fake(model_cfg, adapter_cfg=None, **kw):
        raise _Loaded(model_cfg)

    monkeypatch.setattr(loading, "load_model_and_tokenizer", fake)


VERBS = {
    "eval": ["eval", "--no-progress"],
    "predict": ["predict", "--task", "sentiment_sst2", "--no-progress"],
    "prompt": ["prompt", "--task", "sentiment_sst2", "text=a fine film"],
    "export": ["export"],
}


def _verb_args(verb: str, run: Path, tmp_path: Path) -> list[str]:
    args = VERBS[verb] + ["--run", str(run)]
    if verb == "predict":
        rows = tmp_path / "rows.jsonl"
        rows.write_text('{"text": "a fine film"}\n')
        args += ["--input", str(rows), "--output", str(tmp_path / "preds.jsonl")]
    if verb == "export":
        args += ["--out", str(tmp_path / "exported")]
    return args


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_run_that_needs_remote_code_is_refused_without_the_flag(
    verb, tmp_path, capsys, capture_loader
):
    run = _fake_run(tmp_path, remote=True)
    assert main(_verb_args(verb, run, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "this run's model needs remote code" in err
    assert "pass --trust-remote-code if you trust org/remote-model" in err
    assert not (tmp_path / "exported").exists() and not (tmp_path / "preds.jsonl").exists()


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_the_flag_reaches_the_loader(verb, tmp_path, capture_loader):
    run = _fake_run(tmp_path, remote=True)
    with pytest.raises(_Loaded) as e:
        main(_verb_args(verb, run, tmp_path) + ["--trust-remote-code"])
    assert e.value.args[0].trust_remote_code is True


def test_a_run_without_remote_code_never_enables_it(tmp_path, capture_loader):
    run = _fake_run(tmp_path, remote=False)
    with pytest.raises(_Loaded) as e:
        main(_verb_args("export", run, tmp_path) + ["--trust-remote-code"])
    assert e.value.args[0].trust_remote_code is False


# ------------------------------------------------------------------ 4. own checkpoints only


def _checkpoint(run: Path, step: int, rid: str | None) -> Path:
    ck = run / "checkpoints" / f"step-{step}"
    ck.mkdir(parents=True)
    state = {"global_step": step}
    if rid is not None:
        state["run_id"] = rid
    (ck / checkpointing.STATE_FILE).write_text(json.dumps(state))
    return ck


def test_resume_point_accepts_only_the_runs_own_checkpoints(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "run_id").write_text("aaa\n")
    (b / "run_id").write_text("bbb\n")
    own = _checkpoint(a, 2, "aaa")
    assert checkpointing.resume_point("auto", a) == own
    assert checkpointing.resume_point(str(own), a) == own
    assert checkpointing.resume_point(str(a / "checkpoints/../checkpoints/step-2"), a)
    with pytest.raises(T2TError, match="not a checkpoint of this run") as e:
        checkpointing.resume_point(str(own), b)  # another run's folder
    assert e.value.exit_code == 2 and "trusted input" in e.value.problems[0].hint
    stray = b / "checkpoints" / "step-2"
    shutil.copytree(own, stray)  # another run's checkpoint copied into this run's folder
    for mode in ("auto", str(stray)):
        with pytest.raises(T2TError, match="belongs to another run"):
            checkpointing.resume_point(mode, b)
    # Written before run ids existed: accepted in the run's own checkpoints/ only.
    c = tmp_path / "c"
    old = _checkpoint(c, 4, None)
    assert checkpointing.resume_point("auto", c) == old
    assert checkpointing.resume_point(str(old), c) == old
    with pytest.raises(T2TError, match="not a checkpoint of this run"):
        checkpointing.resume_point(str(old), b)
    assert checkpointing.resume_point("never", b) is None


@pytest.mark.usefixtures("one_thread")
def test_training_resumes_its_own_checkpoint_and_refuses_another_runs(
    tmp_path, tiny_causal_dir, capsys
):
    def train(out: Path, *extra: str) -> int:
        return main(
            [
                "train",
                "--config",
                str(REPO / "launch/configs/tiny_cpu.yaml"),
                f"model.name={tiny_causal_dir}",
                f"output_dir={out}",
                "train.steps=2",
                "train.save_steps=2",
                "train.report_to=none",
                *extra,
            ]
        )

    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a) == 0
    rid = (a / "run_id").read_text().strip()
    state_file = a / "checkpoints" / "step-2" / checkpointing.STATE_FILE
    assert rid and json.loads(state_file.read_text())["run_id"] == rid
    capsys.readouterr()
    assert train(b, f"train.resume={a / 'checkpoints' / 'step-2'}") == 2
    err = capsys.readouterr().err
    assert "not a checkpoint of this run" in err and "trusted input" in err
    shutil.copytree(a / "checkpoints" / "step-2", b / "checkpoints" / "step-2")
    assert train(b) == 2  # resume: auto finds the stray checkpoint and refuses it
    assert "belongs to another run" in capsys.readouterr().err
    assert train(a) == 0  # its own checkpoint resumes
    # A checkpoint written before run ids existed still resumes in its own run folder.
    state = json.loads(state_file.read_text())
    del state["run_id"]
    state_file.write_text(json.dumps(state))
    (a / "run_id").unlink()
    assert train(a) == 0
