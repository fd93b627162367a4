"""Replay buffer: uniform reservoir, quotas, label balance, persistence, replay inside the mixture."""

from __future__ import annotations

import json
import random

import pytest
from scipy import stats

from t2t_mtl.core.config import load_config
from t2t_mtl.core.errors import DataError
from t2t_mtl.core.records import Record
from t2t_mtl.mixing.mixture import (
    Member,
    MixedStream,
    effective_sizes,
    measure_tokens,
    mixing_rates,
    plan_stage,
    replay_member,
)
from t2t_mtl.mixing.replay import ReplayBuffer


def rec(task: str, i: int, label: str = "x", **meta) -> Record:
    return Record(
        task,
        "Classify.",
        f"{task} text {i}",
        label,
        {"row_id": str(i), "template_version": 1, **meta},
    )


def synth(name: str, n: int, labels=("pos", "neg")) -> Member:
    def get(i: int, epoch: int) -> Record:
        return rec(name, i, labels[i % len(labels)], epoch=epoch)

    tokens, exact = measure_tokens(n, get)
    return Member(name, n, tokens, get, exact)


def test_reservoir_is_uniform_chi_square():
    n, k, runs = 30, 6, 3000
    hits = [0] * n
    for seed in range(runs):  # a fixed seed sequence: the test is deterministic
        buf = ReplayBuffer(per_task=k, seed=seed)
        buf.extend(rec("t", i) for i in range(n))
        kept = [int(r.meta["row_id"]) for r in buf.records()]
        assert len(kept) == k and len(set(kept)) == k
        for i in kept:
            hits[i] += 1
    expected = [runs * k / n] * n
    assert stats.chisquare(hits, expected).pvalue > 0.01
    # the test has power: keeping the first k, or a mild bias toward early items, is rejected
    assert stats.chisquare([runs] * k + [0] * (n - k), expected).pvalue < 1e-6
    biased = [e * (1.15 if i < n // 2 else 0.85) for i, e in enumerate(expected)]
    assert stats.chisquare(biased, expected).pvalue < 0.01


def test_quota_per_task_and_determinism():
    def fill(seed):
        buf = ReplayBuffer(per_task=50, seed=seed)
        for i in range(1000):
            buf.add(rec("big", i))
            if i < 20:
                buf.add(rec("small", i))
        return buf

    a = fill(1)
    assert a.counts() == {"big": 50, "small": 20} and a.seen() == {"big": 1000, "small": 20}
    assert [r.to_dict() for r in a.records()] == [r.to_dict() for r in fill(1).records()]
    assert [r.meta["row_id"] for r in a.records("big")] != [
        r.meta["row_id"] for r in fill(2).records("big")
    ]


def test_repeats_and_replayed_records_are_ignored():
    buf = ReplayBuffer(per_task=10, seed=0)
    assert buf.add(rec("t", 1, mix_epoch=0))
    assert not buf.add(rec("t", 1, mix_epoch=1))  # upsampled repeat of a row already offered
    assert not buf.add(rec("t", 2, source="replay"))
    assert buf.seen() == {"t": 1}


def test_label_balanced():
    buf = ReplayBuffer(per_task=20, seed=3, label_balanced=True, label_tasks=["cls"])
    for i in range(900):
        buf.add(rec("cls", i, "common"))
        buf.add(rec("gen", i, f"free text {i % 3}"))  # not a label task: one plain reservoir
    for i in range(100):
        buf.add(rec("cls", 1000 + i, "rare"))
    for i in range(3):
        buf.add(rec("cls", 2000 + i, "tiny"))
    labels = [r.output for r in buf.records("cls")]
    assert len(labels) == 20 and labels.count("tiny") == 3
    assert {labels.count("common"), labels.count("rare")} == {
        8,
        9,
    }  # 17 split as evenly as possible
    assert buf.counts() == {"cls": 20, "gen": 20}
    plain = ReplayBuffer(per_task=20, seed=3)
    for i in range(900):
        plain.add(rec("cls", i, "common"))
    for i in range(100):
        plain.add(rec("cls", 1000 + i, "rare"))
    assert sum(r.output == "rare" for r in plain.records()) < 8  # ~2 expected without balancing


def test_state_round_trip_matches_uninterrupted():
    records = [rec(f"t{i % 3}", i, ["a", "b"][i % 2]) for i in range(3000)]
    whole = ReplayBuffer(per_task=40, seed=9, label_balanced=True, label_tasks=["t0"])
    whole.extend(records)
    for k in random.Random(1).sample(range(1, 3000), 3):
        part = ReplayBuffer(per_task=40, seed=9, label_balanced=True, label_tasks=["t0"])
        part.extend(records[:k])
        resumed = ReplayBuffer.from_state(json.loads(json.dumps(part.state())))
        resumed.extend(records[k:])
        assert [r.to_dict() for r in resumed.records()] == [r.to_dict() for r in whole.records()]


def test_save_and_load(tmp_path):
    buf = ReplayBuffer(per_task=5, seed=4)
    buf.extend(rec("a", i) for i in range(40))
    buf.extend(rec("b", i) for i in range(3))
    folder = buf.save(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tasks"] == ["a", "b"] and manifest["counts"] == {"a": 5, "b": 3}
    assert manifest["seed"] == 4 and manifest["template_versions"] == {"a": [1], "b": [1]}
    lines = (folder / "buffer.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"task", "instruction", "input", "output", "meta"} <= set(
        json.loads(lines[0])
    )
    loaded = ReplayBuffer.load(tmp_path)
    assert [r.to_dict() for r in loaded.records()] == [r.to_dict() for r in buf.records()]
    (folder / "buffer.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="does not match"):
        ReplayBuffer.load(tmp_path)
    with pytest.raises(DataError, match="no replay manifest"):
        ReplayBuffer.load(tmp_path / "elsewhere")


CFG = {
    "seed": 5,
    "tasks": [{"template": "a"}, {"template": "b"}, {"template": "c"}],
    "mixing": {"temperature": 2.0, "cap": 3000},
    "stages": [
        {"name": "first", "tasks": ["a", "b"], "steps": 5},
        {"name": "second", "tasks": ["c"], "steps": 5},
    ],
    "replay": {"enabled": True, "per_task": 30, "share": 0.1},
}
MEMBERS = {"a": synth("a", 400), "b": synth("b", 90), "c": synth("c", 2500)}


def _buffer_after_first_stage(cfg) -> ReplayBuffer:
    buf = ReplayBuffer(cfg.replay.per_task, seed=cfg.seed)
    buf.extend(plan_stage(cfg, "first", MEMBERS).stream().take(2000))
    return buf


def test_replay_joins_mixture_with_share():
    cfg = load_config(data=CFG)
    buf = _buffer_after_first_stage(cfg)
    assert buf.counts() == {"a": 30, "b": 30}
    second = plan_stage(cfg, "second", MEMBERS, replay=replay_member(buf))
    assert second.rates == pytest.approx({"c": 0.9, "replay": 0.1})
    recs = second.stream().take(50_000)
    replayed = [r for r in recs if r.meta["source"] == "replay"]
    assert abs(len(replayed) / len(recs) - 0.1) < 0.01
    assert {r.task for r in replayed} == {"a", "b"}  # replayed records keep their own task
    stream = second.stream()
    stream.take(10_000)
    assert abs(stream.counts()["replay"] / 10_000 - 0.1) < 0.01  # reported like any task's


def test_replay_share_null_follows_temperature_rule():
    cfg = load_config(data={**CFG, "replay": {"enabled": True, "per_task": 30, "share": None}})
    buf = _buffer_after_first_stage(cfg)
    second = plan_stage(cfg, "second", MEMBERS, replay=replay_member(buf))
    sizes = effective_sizes([MEMBERS[t] for t in "abc"], "examples", 3000)
    full = mixing_rates(sizes, 2.0)
    assert second.rates["replay"] == pytest.approx(full["a"] + full["b"])


def test_state_round_trip_stream_with_replay():
    cfg = load_config(data=CFG)
    buf = _buffer_after_first_stage(cfg)
    plan = plan_stage(cfg, "second", MEMBERS, replay=replay_member(buf))
    for k in random.Random(2).sample(range(1, 20_000), 3):
        a = plan.stream()
        a.take(k)
        st = json.loads(json.dumps(a.state()))
        expected = [r.to_dict() for r in a.take(1000)]
        b = plan_stage(
            cfg, "second", MEMBERS, replay=replay_member(ReplayBuffer.from_state(buf.state()))
        ).stream()
        b.load_state(st)
        assert [r.to_dict() for r in b.take(1000)] == expected


def test_empty_buffer_is_a_clear_error():
    with pytest.raises(DataError, match="replay buffer is empty"):
        replay_member(ReplayBuffer(5))


def test_fill_from_member_offers_each_row_once():
    buf = ReplayBuffer(per_task=1000, seed=0)
    assert buf.fill(synth("m", 77)) == 77 and buf.counts() == {"m": 77}
    assert (
        MixedStream([replay_member(buf)], {"replay": 1.0}, 1).take(1)[0].meta["source"] == "replay"
    )
