"""Run folders written before the layer reorganisation still load: eval, predict, prompt, resume.

`tests/fixtures/run_before_layers/` (its README.md says how it was made) holds a two-stage LoRA run
trained by the pre-layer code (commit 397e762, flat `t2t_mtl.*` modules) on the tiny causal model
stored next to it, plus what that code answered on it: `run/eval/old-rank.*` (`eval --mode rank`),
`old_outputs/predict.jsonl` (`predict`), `old_outputs/prompt.json` and `prompt_shown.txt`
(`prompt --json --show-prompt`). The tests run today's CLI on a copy and require the same answers,
and a resumed training to continue exactly where the old run's checkpoint stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from t2t_mtl.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one torch thread

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_before_layers"
# Where the fixture lay when the old code wrote it: the absolute paths in its files start here.
BUILT_AT = "/tmp/t2t_old_fixture"
QA_FIELDS = ["context=Paris is the capital of France.", "question=What is the capital of France?"]


def copy_fixture(dest: Path) -> Path:
    """Copy the fixture to `dest` (returns `dest`) and point its absolute paths at the copy.

    Training records where the base model and the sources were (config.yaml: model.name and the
    qa_squad source path; every bundle's t2t_manifest.json: model.name; old-rank.json: the run
    folder), as absolute paths, so a run works from any working directory. The old code wrote them
    under BUILT_AT; rewriting that prefix stands for a user who left model and data where they
    were. The fixture files themselves stay exactly as the old code wrote them.
    """
    shutil.copytree(FIXTURE, dest)
    rewritten = []
    for f in sorted(dest.rglob("*")):
        if f.is_file() and f.suffix in (".yaml", ".json"):
            text = f.read_text(encoding="utf-8")
            if BUILT_AT in text:
                f.write_text(text.replace(BUILT_AT, str(dest)), encoding="utf-8")
                rewritten.append(f.relative_to(dest).as_posix())
    # The paths the model must be found through; a fixture without them would test nothing here.
    assert {"run/config.yaml", "run/adapter/t2t_manifest.json"} <= set(rewritten), rewritten
    return dest


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    """A copy of the fixture (root folder; the run is `old / "run"`), shared by the read-only verbs."""
    return copy_fixture(tmp_path_factory.mktemp("old-run") / "fx")


def test_eval_writes_results(old):
    run = old / "run"
    assert main(["eval", "--run", str(run), "--limit", "2", "--no-progress"]) == 0
    res = json.loads((run / "eval" / "validation.json").read_text(encoding="utf-8"))
    assert list(res["tasks"]) == ["sentiment_sst2", "qa_squad"]
    assert all(t["n"] == 2 for t in res["tasks"].values())
    assert isinstance(res["combined"], float)
    rows = jsonl(run / "eval" / "validation.predictions.jsonl")
    assert [r["task"] for r in rows] == ["sentiment_sst2"] * 2 + ["qa_squad"] * 2


def test_eval_rank_scores_match_old_code(old):
    """Rank mode scores every label by likelihood, so it shows the adapter, tokenizer, prompt format
    and template copies are read as before (the tiny model's greedy answers are empty: it stops at
    <|im_end|> at once). The base model scores these rows about 2 nats apart from the adapter."""
    run = old / "run"
    # The old code scored the first 4 rows of each task (`--limit 4`); a limit now draws a seeded
    # random subset, so every row is scored (in file order) and the first 4 of each compared.
    argv = ["eval", "--run", str(run), "--limit", "1000", "--mode", "rank", "--name", "new-rank"]
    assert main([*argv, "--no-progress"]) == 0
    every = jsonl(run / "eval" / "new-rank.predictions.jsonl")
    new = [
        r for t in ("sentiment_sst2", "qa_squad") for r in [x for x in every if x["task"] == t][:4]
    ]
    before = jsonl(run / "eval" / "old-rank.predictions.jsonl")
    assert len(new) == len(before) == 8
    for a, b in zip(new, before):
        assert a["source"].endswith(".jsonl:" + str(int(a["row_id"]) + 1))  # added since: file:line
        assert {k: v for k, v in a.items() if k not in ("scores", "source")} == {
            k: v for k, v in b.items() if k != "scores"
        }
        assert a.get("scores", {}).keys() == b.get("scores", {}).keys()
        for label, score in b.get("scores", {}).items():
            assert a["scores"][label] == pytest.approx(score, abs=1e-4)
    assert sum("scores" in r for r in new) == 4  # the sentiment rows were ranked


def test_eval_forgetting_reads_stage_bundles(old):
    run = old / "run"
    argv = ["eval", "--run", str(run), "--forgetting", "--limit", "2", "--mode", "rank"]
    assert main([*argv, "--tasks", "sentiment_sst2", "--no-progress"]) == 0
    rep = json.loads((run / "eval" / "forgetting-rank.json").read_text(encoding="utf-8"))
    assert rep["stages"] == ["first", "second"]
    assert rep["learned_at"] == {"sentiment_sst2": "first"}
    assert len(rep["matrix"]) == 2


def test_predict_matches_old_code(old, tmp_path):
    out = tmp_path / "pred.jsonl"
    inp = old / "old_outputs" / "predict_input.jsonl"
    argv = ["predict", "--run", str(old / "run"), "--task", "sentiment_sst2"]
    assert main([*argv, "--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    assert jsonl(out) == jsonl(old / "old_outputs" / "predict.jsonl")
    assert len(jsonl(out)) == 3


def test_prompt_matches_old_code(old, capsys):
    argv = ["prompt", "--run", str(old / "run"), "--json", "--show-prompt", "--task", "qa_squad"]
    assert main([*argv, *QA_FIELDS]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads((old / "old_outputs" / "prompt.json").read_text())
    shown = (old / "old_outputs" / "prompt_shown.txt").read_text(encoding="utf-8")
    assert "Passage: Paris is the capital of France." in shown
    assert shown in err


def test_compare_reads_old_results_and_export_merges(old, tmp_path):
    run = old / "run"
    results = run / "eval" / "old-rank.json"  # written by the old `eval`
    assert main(["compare", f"old={results}", "--json", str(tmp_path / "c.json")]) == 0
    table = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    primaries = {t: r["primary"] for t, r in json.loads(results.read_text())["tasks"].items()}
    assert table["scores"]["old"] == primaries
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize(
    "ckpt, steps_run",
    [("step-4", 1), ("step-2", 3)],
    ids=["mid-stage", "stage-boundary"],
)
def test_resume_continues_old_checkpoint(tmp_path, capsys, ckpt, steps_run):
    """Resuming an old checkpoint continues at its step and replays the old run exactly (same
    stream position, scheduler, replay buffer, RNG): same losses and same final weights."""
    root = copy_fixture(tmp_path / "fx")
    run = root / "run"
    old_metrics = jsonl(run / "metrics.jsonl")
    old_summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    start = int(ckpt.split("-")[1])
    argv = ["train", "--config", str(run / "config.yaml"), f"output_dir={run}"]
    assert main([*argv, f"train.resume={run / 'checkpoints' / ckpt}"]) == 0
    assert f"(step {start})" in capsys.readouterr().err
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 5
    assert summary["session"]["steps"] == steps_run  # from the checkpoint on, not from step 0
    assert summary["final_loss"] == pytest.approx(old_summary["final_loss"], rel=1e-5)
    for a, b in zip(summary["weight_checksums"][0], old_summary["weight_checksums"][0]):
        assert a == pytest.approx(b, rel=1e-5)

    def losses(rows):
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    new_losses = losses(jsonl(run / "metrics.jsonl"))
    assert sorted(new_losses) == [1, 2, 3, 4, 5]  # old rows up to the checkpoint kept, no repeats
    assert new_losses == pytest.approx(losses(old_metrics), rel=1e-5)
    state = json.loads((run / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    assert (state["global_step"], state["stage"], state["stage_step"]) == (5, "second", 3)
