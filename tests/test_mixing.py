"""Mixing rates and the deterministic, resumable mixed stream (synthetic members; no torch)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from t2t_mtl.core.config import load_config
from t2t_mtl.core.errors import ConfigError, DataError
from t2t_mtl.core.records import Record
from t2t_mtl.mixing.mixture import (
    Member,
    MixedStream,
    count_target_tokens,
    effective_sizes,
    measure_tokens,
    member_from_records,
    mixing_rates,
    plan_stage,
)


def synth(name: str, n: int, out_words: int = 1) -> Member:
    """A lazily rendering member whose records say which row and epoch they came from."""

    def get(i: int, epoch: int) -> Record:
        return Record(
            name,
            "Do it.",
            f"{name} row {i}",
            " ".join(["w"] * out_words),
            {"row_id": str(i), "epoch": epoch, "variant": f"v{(i + epoch) % 2}"},
        )

    tokens, exact = measure_tokens(n, get)
    return Member(name, n, tokens, get, exact)


def shares(records) -> dict[str, float]:
    c = Counter(r.task for r in records)
    return {k: v / len(records) for k, v in c.items()}


def formula(sizes, T, K):
    s = {k: min(n, K) ** (1 / T) for k, n in sizes.items()}
    return {k: v / sum(s.values()) for k, v in s.items()}


def test_rates_follow_formula_and_limits():
    sizes = {"a": 10.0, "b": 1000.0, "c": 50000.0}
    for T, K in [(1, None), (2, 3000), (3.3, 500), (1, 1000)]:
        got = mixing_rates(sizes, T, K)
        want = formula(sizes, T, K if K else float("inf"))
        assert got == pytest.approx(want, abs=1e-12)
    assert mixing_rates(sizes, 1.0, None)["c"] == pytest.approx(50000 / 51010)
    assert set(np.round(list(mixing_rates(sizes, 1e9, None).values()), 6)) == {
        round(1 / 3, 6)
    }  # T→∞: equal
    assert mixing_rates(sizes, 1.0, 10) == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    )  # all capped
    assert list(mixing_rates(sizes, 2.0, 3000)) == ["a", "b", "c"]


@pytest.mark.parametrize(
    "T,K,sizes",
    [
        (1.0, None, [10, 10_000]),  # 1:1000 imbalance, proportional
        (2.0, 3000, [10, 10_000, 300]),
        (3.3, 500, [5, 5000, 40, 777]),
        (1e6, None, [3, 3000, 30]),  # ~equal
    ],
)
def test_realised_shares_within_one_point(T, K, sizes):
    members = [synth(f"t{i}", n) for i, n in enumerate(sizes)]
    rates = mixing_rates(effective_sizes(members, "examples", K), T)
    got = shares(MixedStream(members, rates, seed=123).take(100_000))
    for name, p in rates.items():
        assert abs(got.get(name, 0.0) - p) < 0.01, (name, got, rates)


def test_every_epoch_is_a_fresh_full_permutation_and_variants_see_the_epoch():
    m = synth("small", 50)
    stream = MixedStream([m, synth("big", 5000)], {"small": 0.5, "big": 0.5}, seed=7)
    small = [r for r in stream.take(2000) if r.task == "small"]
    epochs: dict[int, list[int]] = {}
    for r in small:
        assert r.meta["mix_epoch"] == r.meta["epoch"]  # the stream passes the task-epoch to get()
        epochs.setdefault(r.meta["epoch"], []).append(int(r.meta["row_id"]))
    full = [rows for e, rows in sorted(epochs.items()) if len(rows) == 50]
    assert len(full) >= 10
    assert all(sorted(rows) == list(range(50)) for rows in full)  # each row exactly once per epoch
    assert len({tuple(rows) for rows in full}) == len(full)  # never the same order twice
    assert full[0] != list(range(50))  # shuffled, not file order


def test_stream_deterministic_for_seed():
    ms = [synth("a", 30), synth("b", 70)]
    rates = {"a": 0.3, "b": 0.7}

    def run(seed):
        return [(r.task, r.meta["row_id"]) for r in MixedStream(ms, rates, seed).take(3000)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def _round_trip(make_stream, total=20_000, trials=3):
    rnd = random.Random(0)
    for _ in range(trials):
        k = rnd.randrange(1, total)
        a = make_stream()
        a.take(k)
        saved = json.loads(json.dumps(a.state()))  # must survive JSON
        assert len(json.dumps(saved)) < 2000  # small: no permutations or records inside
        expected = [r.to_dict() for r in a.take(1000)]
        b = make_stream()
        b.load_state(saved)
        assert [r.to_dict() for r in b.take(1000)] == expected
        fresh = make_stream()
        fresh.take(k)
        assert [r.to_dict() for r in fresh.take(1000)] == expected


def test_state_round_trip_plain_stream():
    ms = [synth("a", 7), synth("b", 1000), synth("c", 123)]
    rates = mixing_rates(effective_sizes(ms), 2.0, 3000)
    _round_trip(lambda: MixedStream(ms, rates, seed=99))


def test_load_state_rejects_changed_data_or_settings():
    ms = [synth("a", 7), synth("b", 100)]
    s = MixedStream(ms, {"a": 0.5, "b": 0.5}, seed=1)
    s.take(10)
    st = s.state()
    with pytest.raises(DataError, match="other sizes"):
        MixedStream([synth("a", 8), synth("b", 100)], {"a": 0.5, "b": 0.5}, seed=1).load_state(st)
    with pytest.raises(DataError, match="seed or other rates"):
        MixedStream(ms, {"a": 0.4, "b": 0.6}, seed=1).load_state(st)


def test_token_unit_favours_long_outputs():
    short, long_ = synth("short", 1000, out_words=2), synth("long", 1000, out_words=18)
    assert short.tokens == 2000 and long_.tokens == 18000 and short.tokens_exact
    ex = mixing_rates(effective_sizes([short, long_], "examples", 3000), 1.0)
    tok = mixing_rates(effective_sizes([short, long_], "tokens", 3000), 1.0)
    assert ex == pytest.approx({"short": 0.5, "long": 0.5})
    assert tok == pytest.approx({"short": 0.1, "long": 0.9})
    tok2 = mixing_rates(effective_sizes([short, long_], "tokens", 3000), 2.0)
    assert tok2["long"] / tok2["short"] == pytest.approx(3.0)  # sqrt(9)
    # the cap still counts examples: a huge short task is capped before weighing by length
    capped = effective_sizes([synth("huge", 100_000, 2), long_], "tokens", 3000)
    assert capped == {"huge": 6000.0, "long": 18000.0}
    got = shares(MixedStream([short, long_], tok, seed=3).take(20_000))
    assert abs(got["long"] - 0.9) < 0.01


def test_token_estimate_from_sample():
    m = synth("big", 10_000, out_words=3)
    assert m.tokens_exact is False and m.tokens == pytest.approx(30_000)
    assert count_target_tokens("New York, N.Y. (B-LOC)") == 12


def test_floors_and_ceilings():
    sizes = {"tiny": 10.0, "mid": 1000.0, "huge": 100000.0}
    base = mixing_rates(sizes, 1.0)
    assert base["tiny"] < 0.001
    r = mixing_rates(sizes, 1.0, floors={"tiny": 0.05}, ceilings={"huge": 0.6})
    assert r["tiny"] == pytest.approx(0.05) and r["huge"] == pytest.approx(0.6)
    assert r["mid"] == pytest.approx(0.35) and sum(r.values()) == pytest.approx(1.0)
    # only a floor: the others keep their ratio
    r2 = mixing_rates(sizes, 1.0, floors={"tiny": 0.2})
    assert r2["tiny"] == pytest.approx(0.2)
    assert r2["huge"] / r2["mid"] == pytest.approx(100.0)
    with pytest.raises(ConfigError, match="floors sum"):
        mixing_rates(sizes, 1.0, floors={"tiny": 0.6, "mid": 0.6})
    with pytest.raises(ConfigError, match="ceilings sum"):
        mixing_rates(sizes, 1.0, ceilings={"tiny": 0.2, "mid": 0.2, "huge": 0.2})
    # a ceiling that pushes mass to a task with a floor still ends inside every bound
    r3 = mixing_rates(sizes, 1.0, floors={"tiny": 0.1}, ceilings={"huge": 0.5, "mid": 0.3})
    assert r3 == pytest.approx({"tiny": 0.2, "mid": 0.3, "huge": 0.5})
    # a fixed share (replay) is never rescaled by the clamping of the others
    r4 = mixing_rates({**sizes, "replay": 5.0}, 1.0, floors={"tiny": 0.2}, shares={"replay": 0.1})
    assert r4["replay"] == pytest.approx(0.1) and r4["tiny"] == pytest.approx(0.2)
    assert r4["huge"] / r4["mid"] == pytest.approx(100.0) and sum(r4.values()) == pytest.approx(1.0)


def test_explicit_weights():
    sizes = {"a": 100.0, "b": 100.0, "c": 10000.0}
    assert mixing_rates(sizes, 2.0, weights={"a": 1, "b": 1, "c": 2}) == pytest.approx(
        {"a": 0.25, "b": 0.25, "c": 0.5}
    )
    part = mixing_rates(sizes, 1.0, weights={"c": 0.2})  # some weighted: weights are shares
    assert part == pytest.approx({"a": 0.4, "b": 0.4, "c": 0.2})
    with pytest.raises(ConfigError, match="leaving no share"):
        mixing_rates(sizes, 1.0, weights={"c": 1.5})
    with_share = mixing_rates(
        {**sizes, "replay": 50.0}, 1.0, weights={"a": 1, "b": 1, "c": 2}, shares={"replay": 0.2}
    )
    assert with_share == pytest.approx({"a": 0.2, "b": 0.2, "c": 0.4, "replay": 0.2})


CFG = {
    "seed": 11,
    "tasks": [
        {"template": "a"},
        {"template": "b", "floor": 0.3},
        {"template": "c"},
        {"template": "d", "weight": 0.25},
    ],
    "mixing": {"temperature": 1.0, "cap": 1000},
    "stages": [
        {"name": "one", "tasks": ["a", "b"], "steps": 5},
        {"name": "two", "tasks": ["c", "d"], "steps": 5, "temperature": 4.0},
    ],
}


def test_stage_switching():
    cfg = load_config(data=CFG)
    members = {n: synth(n, s) for n, s in zip("abcd", [900, 100, 5000, 10])}
    one, two = plan_stage(cfg, "one", members), plan_stage(cfg, 1, members)
    assert one.rates == pytest.approx(
        {"a": 0.7, "b": 0.3}
    )  # 0.9/0.1 by size, b raised to its floor
    assert one.temperature == 1.0 and two.temperature == 4.0
    assert two.rates == pytest.approx(
        {"c": 0.75, "d": 0.25}
    )  # only d weighted: its weight is a share
    assert {r.task for r in one.stream().take(500)} == {"a", "b"}
    assert {r.task for r in two.stream().take(500)} <= {"c", "d"}
    assert one.seed != two.seed
    with pytest.raises(ConfigError, match="unknown stage 'tow'.*did you mean 'two'"):
        plan_stage(cfg, "tow", members)


def test_stage_temperature_applies():
    data = dict(
        CFG, tasks=[{"template": "a"}, {"template": "b"}, {"template": "c"}, {"template": "d"}]
    )
    cfg = load_config(data=data)
    members = {n: synth(n, s) for n, s in zip("abcd", [900, 100, 4000, 10])}
    two = plan_stage(cfg, "two", members)
    assert two.rates == pytest.approx(formula({"c": 1000, "d": 10}, 4.0, 1000))


def test_mixing_modules_import_no_torch():
    code = (
        "import sys, t2t_mtl.mixing.mixture, t2t_mtl.mixing.replay; "
        "bad = [m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_member_from_records_returns_copies():
    m = member_from_records("x", [Record("x", "i", "in", "out", {"k": 1})])
    r = m.get(0, 0)
    r.meta["k"] = 2
    assert m.get(0, 0).meta["k"] == 1 and m.tokens == 1


# ---------------------------------------------------------------- the `mix` verb (synthetic members)


def _fake_members(monkeypatch, sizes):
    import t2t_mtl.mixing.mixture as mixing

    def build(cfg, names=None, **kw):
        out = {n: synth(n, s) for n, s in sizes.items() if names is None or n in names}
        for m in out.values():
            m.skipped = 2
            m.info["label_task"] = True
        return out

    monkeypatch.setattr(mixing, "build_members", build)
    monkeypatch.setattr(
        "t2t_mtl.tasks.catalogue.check_config", lambda cfg: []
    )  # synthetic task names


def test_mix_verb_table_dump_plot_and_replay(tmp_path, monkeypatch, capsys):
    import yaml

    from t2t_mtl.cli.main import main
    from t2t_mtl.core.records import read_jsonl

    _fake_members(monkeypatch, {"a": 400, "b": 90, "c": 2500})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "tasks": [{"template": "a"}, {"template": "b"}, {"template": "c"}],
                "stages": [
                    {"name": "first", "tasks": ["a", "b"], "steps": 10},
                    {"name": "second", "tasks": ["c"], "steps": 10},
                ],
                "replay": {"enabled": True, "per_task": 20, "share": 0.2},
                "train": {"batch_size": 4},
            }
        )
    )
    out, png = tmp_path / "dump.jsonl", tmp_path / "mix.png"
    assert (
        main(
            [
                "mix",
                "--config",
                str(cfg),
                "mixing.temperature=1",
                "--dump",
                "3000",
                "--out",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    text, err = capsys.readouterr()
    assert "bad rows skipped: a 2, b 2, c 2" in err
    assert "stage first: T=1" in text and "stage second: T=1" in text
    recs = list(read_jsonl(out))
    assert len(recs) == 6000 and {r.meta["stage"] for r in recs} == {"first", "second"}
    second = [r for r in recs if r.meta["stage"] == "second"]
    replayed = sum(r.meta["source"] == "replay" for r in second) / len(second)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("replay"))
    assert line.split()[-2:] == ["20.00%", f"{replayed:.2%}"]  # target then realised
    assert {r.task for r in second if r.meta["source"] == "replay"} == {"a", "b"}
    assert png.stat().st_size > 1000

    assert main(["mix", "--config", str(cfg), "--stage", "secnd"]) == 2
    assert "unknown stage 'secnd' (did you mean 'second'?)" in capsys.readouterr().err
    assert main(["mix", "--config", str(cfg), "--dump", "5"]) == 2
    png.unlink()
    assert main(["mix", "--config", str(cfg), "--stage", "second", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "stage first" not in text and "replay" in text  # earlier stage still fed the buffer
    assert "realised  (first 10000)" in text and png.is_file()  # realised shares from index draws


def mix_preview_offers(monkeypatch, argv: list[str]) -> list[tuple[str, int, list[dict]]]:
    """Run `t2t-mtl mix ARGV`; per offering to the replay buffer: (stage, records offered, the
    buffer's records afterwards as dicts). Spies on `mixture.offer_stage_records`, which training
    calls too."""
    import t2t_mtl.mixing.mixture as mixing
    from t2t_mtl.cli.main import main

    offers = []
    real = mixing.offer_stage_records

    def spy(buf, plan, n):
        kept = real(buf, plan, n)
        offers.append((plan.name, n, [json.loads(json.dumps(r.to_dict())) for r in buf.records()]))
        return kept

    with monkeypatch.context() as m:
        m.setattr(mixing, "offer_stage_records", spy)
        assert main(["mix", *argv]) == 0
    return offers


def test_mix_preview_offers_what_every_process_trains_on(tmp_path, monkeypatch, capsys):
    """`--processes N` (default $WORLD_SIZE): each stage offers steps x batch x accum x N records,
    so the preview's buffer is the one an N-process run builds (test_training's DDP test compares it
    with a real two-process run)."""
    import yaml

    _fake_members(monkeypatch, {"a": 400, "b": 90, "c": 2500})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "tasks": [{"template": "a"}, {"template": "b"}, {"template": "c"}],
                "stages": [
                    {"name": "first", "tasks": ["a", "b"], "steps": 10},
                    {"name": "second", "tasks": ["c"], "steps": 5},
                    {"name": "third", "tasks": ["a"], "steps": 2},
                ],
                "replay": {"enabled": True, "per_task": 60, "share": 0.2},
                "train": {"batch_size": 4},
            }
        )
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    two = mix_preview_offers(monkeypatch, ["--config", str(cfg), "--processes", "2"])
    assert [(st, n) for st, n, _ in two] == [("first", 10 * 4 * 2), ("second", 5 * 4 * 2)]
    assert {r["task"] for r in two[-1][2]} == {"a", "b", "c"}
    # one process accumulating two micro-batches trains on the same records per step
    accum = mix_preview_offers(monkeypatch, ["--config", str(cfg), "train.grad_accum=2"])
    assert accum == two
    one = mix_preview_offers(monkeypatch, ["--config", str(cfg)])
    assert [n for _, n, _ in one] == [40, 20] and one[0][2] != two[0][2]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert mix_preview_offers(monkeypatch, ["--config", str(cfg)]) == two
    capsys.readouterr()

    from t2t_mtl.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["mix", "--config", str(cfg)]) == 2
    assert "$WORLD_SIZE: 'two' is not a number of processes >= 1" in capsys.readouterr().err
    assert main(["mix", "--config", str(cfg), "--processes", "0"]) == 2
    assert "--processes: '0' is not a number of processes >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- real data (skipped where absent)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
REAL_TASKS = {"sentiment_sst2", "nli_3way", "qa_squad", "ner_conll2003", "summarization"}


@pytest.fixture
def real_config(monkeypatch):
    if not REAL.is_dir():
        pytest.skip("real data slices not available")
    monkeypatch.chdir(ROOT)  # the config's ../shared paths are relative to the repository root
    return ROOT / "launch" / "configs" / "mix_real.yaml"


def test_mix_verb_on_real_slices(real_config, tmp_path, capsys):
    from t2t_mtl.cli.main import main
    from t2t_mtl.core.records import read_jsonl

    out = tmp_path / "mix.jsonl"
    assert main(["mix", "--config", str(real_config), "--dump", "2000", "--out", str(out)]) == 0
    text, err = capsys.readouterr()
    assert "bad rows skipped:" in err
    recs = list(read_jsonl(out))
    assert len(recs) == 2000 and {r.task for r in recs} == REAL_TASKS
    assert all(
        r.input and r.output and r.meta["template_version"] for r in recs
    )  # some variants: no instruction
    rows = {
        ln.split()[0]: ln.split()
        for ln in text.splitlines()
        if ln.strip().split()[:1] and ln.split()[0] in REAL_TASKS
    }
    for task, cols in rows.items():
        target, realised = (float(c.rstrip("%")) for c in cols[-2:])
        got = 100 * sum(r.task == task for r in recs) / len(recs)
        assert realised == pytest.approx(got, abs=0.01) and abs(realised - target) < 4.0
    again = tmp_path / "again.jsonl"
    assert main(["mix", "--config", str(real_config), "--dump", "2000", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic for the seed


def test_real_members_resume_exactly(real_config):
    from t2t_mtl.mixing import mixture

    cfg = load_config(real_config)
    members = mixture.build_members(cfg)
    plan = plan_stage(cfg, 0, members)
    a = plan.stream()
    a.take(2345)
    st = json.loads(json.dumps(a.state()))
    b = plan.stream()
    b.load_state(st)
    assert [r.to_dict() for r in b.take(300)] == [r.to_dict() for r in a.take(300)]
    tok = plan_stage(load_config(real_config, ["mixing.unit=tokens"]), 0, members)
    assert tok.rates["summarization"] > plan.rates["summarization"] > tok.rates["sentiment_sst2"]


def test_zero_rate_and_empty_members_are_never_drawn():
    ms = [synth("a", 5), member_from_records("empty", [])]
    s = MixedStream(ms, {"a": 1.0, "empty": 0.0}, seed=0)
    assert {r.task for r in s.take(5000)} == {"a"}
    with pytest.raises(DataError, match="has no records"):
        MixedStream(ms, {"a": 0.5, "empty": 0.5}, seed=0)


def test_a_task_trains_on_the_variants_the_run_names(tmp_path):
    """`tasks[i].variants` restricts training to those variants (in that order) and makes the
    first the one evaluation asks with; `train.prompt_variants: first` does so with each other
    task's first variant; an unknown or heldout id is a config error at the key."""
    from t2t_mtl.evaluation.evaluator import eval_tasks
    from t2t_mtl.mixing import mixture
    from t2t_mtl.tasks import catalogue

    run = tmp_path / "run.yaml"
    run.write_text(
        "tasks:\n  - {template: qa_squad, variants: [question_first]}\n"
        "  - {template: sentiment_sst2}\n",
        encoding="utf-8",
    )
    cfg = catalogue.load_checked_config(run)
    members = mixture.build_members(cfg)
    seen = {members["qa_squad"].get(i, e).meta["variant"] for i in range(6) for e in range(3)}
    assert seen == {"question_first"}
    assert len({members["sentiment_sst2"].get(i, 0).meta["variant"] for i in range(6)}) > 1
    (squad,) = eval_tasks(cfg, names=["qa_squad"])
    assert squad.variant_id() == "question_first"
    # train.prompt_variants: first -- every task without its own list trains on its first variant
    first = catalogue.load_checked_config(run, ["train.prompt_variants=first"])
    members = mixture.build_members(first)
    sst2 = {members["sentiment_sst2"].get(i, e).meta["variant"] for i in range(6) for e in range(3)}
    (sst2_eval,) = eval_tasks(first, names=["sentiment_sst2"])
    assert sst2 == {sst2_eval.variant_id()}
    assert {members["qa_squad"].get(i, 0).meta["variant"] for i in range(6)} == {"question_first"}
    run.write_text(
        "tasks:\n  - {template: qa_squad, variants: [question_frist, extract_heldout]}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as e:
        catalogue.load_checked_config(run)
    got = [p.format() for p in e.value.problems]
    assert any(
        ":2: tasks[0].variants: template 'qa_squad' has no variant 'question_frist'" in g
        and "did you mean 'question_first'?" in g
        for g in got
    ), got
    assert any("variant 'extract_heldout' is heldout" in g for g in got), got
