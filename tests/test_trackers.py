"""Experiment trackers through accelerate: TensorBoard events, `train.report_to` validation, and a
resumed run continuing the same tracker run (W&B replaced by a recording fake)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from t2t_mtl.cli.main import main
from t2t_mtl.core.config import load_config
from t2t_mtl.core.errors import ConfigError
from t2t_mtl.training import telemetry, trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one torch thread

REPO = Path(__file__).resolve().parents[1]
TOY_TEMPLATES = REPO / "tests" / "fixtures" / "training" / "templates"


def make_cfg(out: Path, model_dir: Path, *overrides: str):
    """Four steps on the two toy tasks (tests/fixtures/training), a metrics row every step."""
    data = {
        "run_name": "tracked",
        "output_dir": str(out),
        "template_dirs": [str(TOY_TEMPLATES)],
        "seed": 3,
        "model": {"name": str(model_dir), "max_length": 96, "max_target_length": 32},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "tasks": [{"template": "toy_polarity"}, {"template": "toy_copy"}],
        "train": {
            "steps": 4,
            "batch_size": 2,
            "logging_steps": 1,
            "save_steps": 2,
            "learning_rate": 1e-2,
            "warmup_steps": 0,
        },
    }
    return load_config(data=data, overrides=list(overrides))


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(logdir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


# ------------------------------------------------------------------ TensorBoard


def test_tensorboard_events_are_written_by_accelerates_tracker(tmp_path, tiny_causal_dir):
    run = trainer.train(make_cfg(tmp_path / "run", tiny_causal_dir, "train.report_to=tensorboard"))
    logdir = run / "logs" / telemetry.PROJECT
    saved = json.loads((run / "trackers.json").read_text())
    assert saved == {"tensorboard": {"logging_dir": str(logdir)}}
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    loss = tb_scalars(logdir, "loss")
    assert sorted(loss) == [1, 2, 3, 4]
    for r in rows:  # the same numbers as metrics.jsonl (TensorBoard stores float32)
        assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert tb_scalars(logdir, "loss/toy_copy")
    # the run config went in as flat hyper-parameters
    hp = list(logdir.glob("*/hparams.yml"))
    assert hp and "train.learning_rate: 0.01" in hp[0].read_text()


def test_flat_config_makes_scalars_of_every_value():
    flat = telemetry.flat_config({"a": {"b": 1, "c": [1, 2], "d": None}, "e": "x", "f": True})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null", "e": "x", "f": True}


# ------------------------------------------------------------------ report_to validation


def test_report_to_takes_a_name_a_list_or_none(tmp_path):
    base = {"tasks": [{"template": "sentiment_sst2"}]}
    for value, names in [
        ("tensorboard", ["tensorboard"]),
        (["tensorboard", "wandb"], ["tensorboard", "wandb"]),
        ("none", []),
        ("mlflow,trackio", ["mlflow", "trackio"]),  # key=value overrides give comma lists
    ]:
        cfg = load_config(data={**base, "train": {"report_to": value}})
        assert telemetry.tracker_names(cfg.train.report_to) == names
    assert load_config(data=base).train.report_to == ["tensorboard"]  # the default


def test_report_to_mistakes_are_reported_at_their_line_with_a_hint(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text(
        "tasks: [{template: sentiment_sst2}]\n"
        "train:\n"
        "  steps: 2\n"
        "  report_to:\n"
        "    - tensorbord\n"
        "    - comet\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as e:
        load_config(f)
    got = [p.format() for p in e.value.problems]
    assert got == [
        f"{f}:5: train.report_to[0]: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)",
        f"{f}:6: train.report_to[1]: unknown tracker 'comet' (did you mean 'comet_ml'?)",
    ]
    assert main(["train", "--config", str(f)]) == 2
    assert f"{f}:5: train.report_to[0]: unknown tracker 'tensorbord'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'none' cannot be combined with trackers"):
        load_config(f, ["train.report_to=[wandb, none]"])
    with pytest.raises(ConfigError, match=r"train.report_to=wandbb: .*did you mean 'wandb'"):
        load_config(f, ["train.report_to=wandbb"])


def test_a_tracker_that_is_not_installed_is_a_note(tmp_path, tiny_causal_dir, monkeypatch, capsys):
    import accelerate.tracking as at

    monkeypatch.setattr(
        at, "_available_trackers", [t for t in at._available_trackers if str(t) != "mlflow"]
    )
    run = trainer.train(
        make_cfg(tmp_path / "run", tiny_causal_dir, "train.report_to=[tensorboard, mlflow]")
    )
    err = capsys.readouterr().err
    assert "note: train.report_to: mlflow, but mlflow is not installed" in err
    assert "pip install mlflow" in err
    assert list(json.loads((run / "trackers.json").read_text())) == ["tensorboard"]


# ------------------------------------------------------------------ resume: the same tracker run


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init kwargs, config and logged rows per run."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = None
        self.inits: list[dict] = []
        self.logged: list[tuple[str, int, dict]] = []
        self.finished: list[str] = []
        self.config = types.SimpleNamespace(update=lambda values, **kw: self.configs.append(values))
        self.configs: list[dict] = []

    def init(self, **kw):
        self.inits.append(kw)
        run_id = kw.get("id") or f"fake-{len(self.inits)}"
        fake = self

        class Run:
            id = run_id

            def log(self, values, step=None):
                fake.logged.append((run_id, step, dict(values)))

            def finish(self):
                fake.finished.append(run_id)

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    import accelerate.tracking as at
    from accelerate.utils import LoggerType

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(at, "_available_trackers", [*at._available_trackers, LoggerType.WANDB])
    return fake


def test_a_resumed_run_continues_the_same_tracker_run(tmp_path, tiny_causal_dir, fake_wandb):
    over = ("train.report_to=[wandb, tensorboard]",)
    out = tmp_path / "run"

    def killer(step, info):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(make_cfg(out, tiny_causal_dir, *over), on_step=killer)
    first = fake_wandb.inits[0]
    assert first["project"] == telemetry.PROJECT and first["name"] == "tracked"
    assert "id" not in first and "resume" not in first
    saved = json.loads((out / "trackers.json").read_text())
    assert saved["wandb"]["id"] == "fake-1"
    assert saved["tensorboard"]["logging_dir"] == str(out / "logs" / telemetry.PROJECT)
    assert fake_wandb.configs and fake_wandb.configs[0]["train.steps"] == 4

    trainer.train(make_cfg(out, tiny_causal_dir, *over))  # resumes from checkpoints/step-2
    again = fake_wandb.inits[1]
    assert again["id"] == "fake-1" and again["resume"] == "allow" and again["name"] == "tracked"
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == "fake-1"
    # every step went to the one W&B run; the killed session's step 3 was logged again
    steps = [(rid, s) for rid, s, v in fake_wandb.logged if "loss" in v]
    assert steps == [("fake-1", 1), ("fake-1", 2), ("fake-1", 3), ("fake-1", 3), ("fake-1", 4)]
    assert fake_wandb.finished[-1] == "fake-1"
    # TensorBoard: the same folder; the killed session's step-3 event is purged on resume
    loss = tb_scalars(out / "logs" / telemetry.PROJECT, "loss")
    rows = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}
    assert sorted(loss) == sorted(rows) == [1, 2, 3, 4]
    assert all(loss[s] == pytest.approx(rows[s], rel=1e-6) for s in rows)

    # a fresh start in the same folder is a new tracker run
    trainer.train(make_cfg(out, tiny_causal_dir, *over, "train.resume=never"))
    assert "id" not in fake_wandb.inits[2]
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == "fake-3"


def test_tracker_init_kwargs_per_tracker(tmp_path):
    saved = {
        "wandb": {"id": "w1"},
        "mlflow": {"run_id": "m1"},
        "trackio": {"name": "t1"},
        "comet_ml": {"experiment_key": "c1"},
    }
    names = ["tensorboard", "wandb", "mlflow", "trackio", "comet_ml"]
    fresh = telemetry.tracker_init_kwargs(names, "r", tmp_path, saved, None)
    assert fresh == {
        "tensorboard": {},
        "wandb": {"name": "r", "dir": str(tmp_path)},
        "mlflow": {"run_name": "r"},
        "trackio": {"name": "r"},
        "comet_ml": {},
    }
    resumed = telemetry.tracker_init_kwargs(names, "r", tmp_path, saved, 6)
    assert resumed == {
        "tensorboard": {"purge_step": 7},
        "wandb": {"name": "r", "dir": str(tmp_path), "id": "w1", "resume": "allow"},
        "mlflow": {"run_id": "m1"},
        "trackio": {"name": "t1", "resume": "allow"},
        "comet_ml": {"experiment_key": "c1", "mode": "get_or_create"},
    }
