"""Task mixing: T5-style temperature rates and a deterministic, resumable, infinite record stream.

Rates. Each task i gets p_i ∝ min(n_i, K)^(1/T) (Raffel et al. 2020, "examples-proportional mixing"
with cap K and temperature T; T=1 is proportional, T→∞ equal). `unit: examples` counts rows;
`unit: tokens` counts target tokens: n_i = min(rows_i, K) × mean target length_i, i.e. K still caps
*examples* and each kept example weighs its average target length. Target length is a cheap,
dependency-free proxy (`count_target_tokens`: words and punctuation marks), measured exactly for tasks
up to `token_sample` rows and extrapolated from an evenly spaced sample above that; pass `count=` to
use a real tokenizer instead. Defaults (T=2, K=3000 in `MixingConfig`) sit between T5's proportional
mixing and mT5's α=0.3 (T≈3.3) and suit the few-thousand-row task sizes this project targets.

Explicit `weight`s: when every task has one, p ∝ weight. When only some do, their weights are fixed
*shares* (of the part not taken by replay) and the other tasks split the rest by the temperature rule.
Then per-task `floor`/`ceiling` shares are enforced: clamp violators, renormalise the rest, solved
exactly as p_i = clip(λ·p_i, floor_i, ceiling_i) (fixed shares such as replay's are never rescaled).

Stream. `MixedStream` draws record k's task from block k // 4096 of a numpy Generator seeded by
(seed, block), so the draw depends only on (seed, k). Each task walks a fresh permutation of its rows
every task-epoch, derived from (seed, task, epoch); small tasks are thus upsampled in a new order each
time and template variants follow the task's policy (`get(row, epoch)`). Records are rendered lazily,
one at a time; nothing but the current index permutation per task (4 bytes a row) is held. `state()`
is a small JSON dict (count, per-task cursor and epoch); `load_state` resumes at exactly record k+1.
Imports: numpy, core, the replay buffer, and tasks (catalogue, sources) for the RunConfig glue
(`build_members`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from t2t_mtl.core.config import RunConfig, StageConfig
from t2t_mtl.core.errors import ConfigError, DataError, Problem, T2TError, did_you_mean
from t2t_mtl.core.records import Record
from t2t_mtl.mixing.replay import ReplayBuffer
from t2t_mtl.tasks import catalogue, sources
from t2t_mtl.tasks.task import Task

__all__ = [
    "Member",
    "MixedStream",
    "StagePlan",
    "build_members",
    "count_target_tokens",
    "derive_seed",
    "effective_sizes",
    "measure_tokens",
    "member_from_records",
    "mixing_rates",
    "offer_stage_records",
    "plan_stage",
    "replay_member",
    "stage_records",
    "stage_replay",
]

STATE_VERSION = 1
_BLOCK = 4096  # task draws generated per numpy call; only (seed, k) decides record k's task
_EPS = 1e-12
_WORDPIECE = re.compile(r"\w+|[^\w\s]")


def count_target_tokens(text: str) -> int:
    """Target-length proxy without a tokenizer: number of words plus punctuation marks."""
    return len(_WORDPIECE.findall(text))


def task_key(name: str) -> int:
    """Stable integer for a task name (seeds its permutations independently of member order)."""
    return zlib.crc32(name.encode("utf-8"))


@dataclass
class Member:
    """One source of records in a mixture: `get(row_index, epoch) -> Record` renders lazily.

    `get` must return a new Record (and meta dict) on every call: the stream annotates its meta.

    `tokens` is the total target length (see `count_target_tokens`), `tokens_exact` False when it was
    extrapolated from a sample. `info` carries e.g. template version, task_type, `source` ("task" or
    "replay") and, for replay, the `tasks` it holds.
    """

    name: str
    size: int
    tokens: float
    get: Callable[[int, int], Record]
    tokens_exact: bool = True
    skipped: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def measure_tokens(
    size: int,
    get: Callable[[int, int], Record],
    count: Callable[[str], int] | None = None,
    sample: int = 2000,
) -> tuple[float, bool]:
    """Total target tokens of `size` records: exact up to `sample` rows, else scaled from an even sample."""
    count = count or count_target_tokens
    if size <= 0:
        return 0.0, True
    m = min(size, sample)
    idx = [i * size // m for i in range(m)]
    total = sum(count(get(i, 0).output) for i in idx)
    return total * size / m, m == size


def member_from_records(
    name: str,
    records: Sequence[Record],
    *,
    count: Callable[[str], int] | None = None,
    info: dict | None = None,
) -> Member:
    """A member over records already in memory (tests, replay); `get` returns copies."""
    recs = list(records)

    def get(i: int, epoch: int) -> Record:
        r = recs[i]
        return Record(r.task, r.instruction, r.input, r.output, dict(r.meta))

    tokens, exact = measure_tokens(len(recs), get, count, sample=len(recs) or 1)
    return Member(name, len(recs), tokens, get, exact, info=dict(info or {}))


# ---------------------------------------------------------------- rates


def effective_sizes(
    members: Sequence[Member], unit: str = "examples", cap: int | None = None
) -> dict[str, float]:
    """n_i for the rate formula: min(rows, K) in `examples`, times mean target length in `tokens`."""
    out = {}
    for m in members:
        n = m.size if cap is None else min(m.size, cap)
        out[m.name] = (
            float(n) * (m.tokens / m.size if m.size else 0.0) if unit == "tokens" else float(n)
        )
    return out


def mixing_rates(
    sizes: Mapping[str, float],
    temperature: float = 2.0,
    cap: float | None = None,
    *,
    weights: Mapping[str, float | None] | None = None,
    floors: Mapping[str, float | None] | None = None,
    ceilings: Mapping[str, float | None] | None = None,
    shares: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Mixing rates p_i ∝ min(n_i, cap)^(1/T), with explicit weights, fixed shares and floor/ceiling clamps.

    `shares` (e.g. {"replay": 0.1}) are fixed fractions of the whole; the other tasks split the rest.
    Returns a dict in the order of `sizes`, summing to 1. Raises ConfigError when the constraints
    cannot all hold (floors summing above 1, weights leaving nothing for the others, ...).
    """
    names = list(sizes)
    shares = dict(shares or {})
    weights = {
        k: float(v)
        for k, v in (weights or {}).items()
        if v is not None and k in sizes and k not in shares
    }
    floors = {k: v for k, v in (floors or {}).items() if v is not None}
    ceilings = {k: v for k, v in (ceilings or {}).items() if v is not None}
    problems = []
    if not names:
        problems.append(Problem.at("<mixing>", "no tasks to mix"))
    if not temperature > 0:  # also NaN
        problems.append(Problem.at("<mixing>", f"temperature must be > 0, got {temperature}"))
    fixed_mass = sum(shares.values())
    if any(v < 0 for v in shares.values()) or fixed_mass > 1 + _EPS:
        problems.append(
            Problem.at("<mixing>", f"fixed shares {shares} must be >= 0 and sum to at most 1")
        )
    if any(v < 0 for v in weights.values()):
        problems.append(Problem.at("<mixing>", "weights must be >= 0"))
    if sum(floors.get(k, 0.0) for k in names) > 1 + _EPS:
        problems.append(
            Problem.at("<mixing>", "floors sum to more than 1", "lower some task's floor")
        )
    if sum(ceilings.get(k, 1.0) for k in names) < 1 - _EPS:
        problems.append(
            Problem.at("<mixing>", "ceilings sum to less than 1", "raise some task's ceiling")
        )
    if problems:
        raise ConfigError(problems)
    free = [k for k in names if k not in shares]
    rest = 1.0 - fixed_mass
    p: dict[str, float] = {k: shares[k] for k in shares if k in sizes}
    if weights and len(weights) == len(free):  # every task weighted: plain relative weights
        total = sum(weights.values())
        if total <= 0:
            raise ConfigError(
                [
                    Problem.at(
                        "<mixing>", "all weights are 0", "give at least one task a positive weight"
                    )
                ]
            )
        p.update({k: rest * weights[k] / total for k in free})
    else:
        wmass = sum(weights.values())
        if wmass >= 1 - _EPS:
            raise ConfigError(
                [
                    Problem.at(
                        "<mixing>",
                        f"explicit weights of {sorted(weights)} sum to {wmass:g}, leaving no share "
                        "for the tasks without one",
                        "give every task a weight, or use weights as shares summing below 1",
                    )
                ]
            )
        p.update({k: rest * w for k, w in weights.items()})
        others = [k for k in free if k not in weights]
        exp = 1.0 / temperature
        # n^(1/T) in log space, scaled by the largest: a small T (0.001) would overflow a float
        logs = {
            k: exp * math.log(min(sizes[k], cap) if cap is not None else sizes[k])
            for k in others
            if sizes[k] > 0
        }
        top = max(logs.values(), default=0.0)
        scores = {k: math.exp(logs[k] - top) if k in logs else 0.0 for k in others}
        total = sum(scores.values())
        if total <= 0:
            raise ConfigError(
                [Problem.at("<mixing>", f"tasks {others} are empty", "check their sources")]
            )
        p.update({k: rest * (1 - wmass) * s / total for k, s in scores.items()})
    p = _clamp(p, floors, ceilings, frozen=set(shares))
    return {k: p[k] for k in names}


def _clamp(
    p: dict[str, float], floors: Mapping[str, float], ceilings: Mapping[str, float], frozen: set
) -> dict[str, float]:
    """Clamp shares to [floor, ceiling] and renormalise the rest, solved exactly.

    Repeated clamp-and-renormalise converges to p_i = clip(λ·p_i, floor_i, ceiling_i) with the
    free shares summing to 1 − (frozen shares). The sum is piecewise linear and non-decreasing in λ
    with kinks at floor_i/p_i and ceiling_i/p_i, so λ is found by interpolating between kinks.
    """
    fixed = {k: p[k] for k in frozen if k in p}
    free = [k for k in p if k not in fixed]
    mass = 1.0 - sum(fixed.values())
    lo = {k: floors.get(k, 0.0) for k in free}
    hi = {k: max(ceilings.get(k, 1.0), lo[k]) for k in free}
    if all(lo[k] - 1e-12 <= p[k] <= hi[k] + 1e-12 for k in free):
        return p  # nothing to clamp: keep the rates bit-for-bit

    def total(lam: float) -> float:
        return sum(min(max(lam * p[k], lo[k]), hi[k]) for k in free)

    kinks = sorted({0.0} | {b / p[k] for k in free if p[k] > 0 for b in (lo[k], hi[k])})
    sums = [total(x) for x in kinks]
    if not free or sums[0] > mass + 1e-9 or sums[-1] < mass - 1e-9:
        raise ConfigError(
            [
                Problem.at(
                    "<mixing>",
                    "floors/ceilings cannot all be met",
                    "floors must sum to at most, ceilings of used tasks to at least, "
                    "the share left for them",
                )
            ]
        )
    j = next(j for j in range(len(kinks)) if sums[j] >= mass - 1e-12)
    lam = (
        kinks[j]
        if j == 0 or sums[j] == sums[j - 1]
        else kinks[j - 1]
        + (mass - sums[j - 1]) * (kinks[j] - kinks[j - 1]) / (sums[j] - sums[j - 1])
    )
    return {**fixed, **{k: min(max(lam * p[k], lo[k]), hi[k]) for k in free}}


# ---------------------------------------------------------------- stream


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (stage seeds from the run seed and stage index)."""
    return int(
        np.random.SeedSequence([int(x) & 0xFFFFFFFFFFFFFFFF for x in parts]).generate_state(
            1, np.uint64
        )[0]
        >> 1
    )


class MixedStream:
    """Infinite iterator of Records mixed by `rates`; deterministic for `seed`, resumable via `state()`.

    Record k's task comes from (seed, k) alone; task i's rows are visited in the permutation of
    (seed, task, epoch). Rendered records get meta `source` ("task"/"replay") and `mix_epoch`.
    """

    def __init__(self, members: Sequence[Member], rates: Mapping[str, float], seed: int):
        missing = [m.name for m in members if m.name not in rates]
        empty = [m.name for m in members if m.size <= 0 and rates.get(m.name, 0) > 0]
        if missing or empty:
            raise DataError(
                [Problem.at("<mixing>", f"no rate for member '{n}'") for n in missing]
                + [
                    Problem.at("<mixing>", f"member '{n}' has no records", "check its source")
                    for n in empty
                ]
            )
        self.members = list(members)
        self.rates = {m.name: float(rates[m.name]) for m in self.members}
        self.seed = int(seed)
        w = np.array([self.rates[m.name] for m in self.members], dtype=np.float64)
        if not len(w) or w.sum() <= 0:
            raise DataError([Problem.at("<mixing>", "nothing to mix: every rate is 0")])
        self._cum = np.cumsum(w / w.sum())
        self._last = int(
            np.flatnonzero(w > 0)[-1]
        )  # rounding at the top end lands here, never on a 0 rate
        self._keys = [task_key(m.name) for m in self.members]
        self._source = [m.info.get("source", "task") for m in self.members]
        self.count = 0
        self._cursor = [0] * len(self.members)
        self._epoch = [0] * len(self.members)
        self._perm: list[np.ndarray | None] = [None] * len(self.members)
        self._block_id = -1
        self._block: list[int] = []

    def _draws(self, block: int) -> list[int]:
        u = np.random.Generator(np.random.PCG64([self.seed, 0, block])).random(_BLOCK)
        return np.minimum(np.searchsorted(self._cum, u, side="right"), self._last).tolist()

    def permutation(self, i: int, epoch: int) -> np.ndarray:
        """Row order of member `i` in `epoch` (fresh every epoch, independent of the other members)."""
        n = self.members[i].size
        rng = np.random.Generator(np.random.PCG64([self.seed, 1, self._keys[i], epoch]))
        return rng.permutation(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))

    def next_index(self) -> tuple[int, int, int]:
        """Advance without rendering: (member index, row index, epoch) of the next record."""
        b, off = divmod(self.count, _BLOCK)
        if b != self._block_id:
            self._block, self._block_id = self._draws(b), b
        i = self._block[off]
        c, e = self._cursor[i], self._epoch[i]
        perm = self._perm[i]
        if perm is None:
            perm = self._perm[i] = self.permutation(i, e)
        row = int(perm[c])
        c += 1
        if c == self.members[i].size:  # task-epoch finished: next record starts a new permutation
            c, self._epoch[i], self._perm[i] = 0, e + 1, None
        self._cursor[i] = c
        self.count += 1
        return i, row, e

    def __iter__(self) -> Iterator[Record]:
        return self

    def __next__(self) -> Record:
        return self.render(*self.next_index())

    def render(self, i: int, row: int, epoch: int) -> Record:
        """The record for a draw of `next_index()`, annotated with meta `source` and `mix_epoch`."""
        rec = self.members[i].get(row, epoch)
        meta = (
            rec.meta
        )  # get() returns a fresh Record (see Member), so annotating it in place is safe
        meta["source"] = self._source[i]
        meta["mix_epoch"] = epoch
        return rec

    def take(self, n: int) -> list[Record]:
        """The next `n` records."""
        return [next(self) for _ in range(n)]

    def counts(self) -> dict[str, int]:
        """Records drawn so far per member (for realised shares)."""
        return {
            m.name: self._epoch[i] * m.size + self._cursor[i] for i, m in enumerate(self.members)
        }

    def state(self) -> dict:
        """Small JSON-serialisable position: record count plus per-member cursor and epoch."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "count": self.count,
            "rates": dict(self.rates),
            "members": {
                m.name: {
                    "size": m.size,
                    "cursor": self._cursor[i],
                    "epoch": self._epoch[i],
                    "perm_seed": [self.seed, 1, self._keys[i], self._epoch[i]],
                }
                for i, m in enumerate(self.members)
            },
        }

    def load_state(self, state: Mapping) -> None:
        """Resume from `state()`: the next record is the one that followed when it was saved."""
        probs = []
        if state.get("version") != STATE_VERSION:
            probs.append(
                Problem.at("<mixing>", f"unknown mixing state version {state.get('version')!r}")
            )
        saved = state.get("members", {})
        now = {m.name: m.size for m in self.members}
        if {k: v.get("size") for k, v in saved.items()} != now:
            probs.append(
                Problem.at(
                    "<mixing>",
                    f"stream state was saved for members {sorted(saved)} with other sizes than "
                    f"now ({now})",
                    "the tasks or their data changed; restart the stage",
                )
            )
        if state.get("seed") != self.seed or any(
            abs(state.get("rates", {}).get(k, -1) - v) > 1e-12 for k, v in self.rates.items()
        ):
            probs.append(
                Problem.at(
                    "<mixing>",
                    "stream state was saved with another seed or other rates",
                    "resume with the same mixing settings",
                )
            )
        if probs:
            raise DataError(probs)
        self.count = int(state["count"])
        for i, m in enumerate(self.members):
            self._cursor[i] = int(saved[m.name]["cursor"])
            self._epoch[i] = int(saved[m.name]["epoch"])
            self._perm[i] = None
        self._block_id = -1


# ---------------------------------------------------------------- stages and replay


def replay_member(buffer: ReplayBuffer, name: str = "replay") -> Member:
    """A `replay.ReplayBuffer` as a mixture Member (records keep their task; `source` becomes "replay")."""
    recs = buffer.records()
    if not recs:
        raise DataError(
            [
                Problem.at(
                    "<mixing>",
                    "the replay buffer is empty",
                    "replay needs records from an earlier stage",
                )
            ]
        )
    return member_from_records(name, recs, info={"source": "replay", "tasks": buffer.tasks()})


def stage_replay(buffer: ReplayBuffer | None) -> Member | None:
    """The replay member a stage mixes in: None without a buffer or while it is still empty (the
    first stage), else `replay_member(buffer)`. Training and `t2t-mtl mix` both plan with it."""
    return replay_member(buffer) if buffer is not None and buffer.records() else None


def stage_records(cfg: RunConfig, stage: int, processes: int) -> int:
    """Records stage `stage` (index) of a RunConfig trains on: steps × batch_size × grad_accum ×
    processes. Every process walks the same stream and each optimiser step consumes one window of
    `processes × grad_accum` micro-batches of it (see `training.batching`)."""
    tr = cfg.train
    return cfg.stage_list()[stage].steps * tr.batch_size * tr.grad_accum * processes


@dataclass
class StagePlan:
    """Everything that defines one stage's mixture; `stream()` starts it from record 0."""

    name: str
    index: int
    temperature: float
    members: list[Member]
    sizes: dict[str, float]  # n_i used by the rate formula (capped; tokens when unit=tokens)
    rates: dict[str, float]
    seed: int

    def stream(self) -> MixedStream:
        """A fresh stream of this stage (call `load_state` to resume)."""
        return MixedStream(self.members, self.rates, self.seed)


def plan_stage(
    cfg: RunConfig,
    stage: StageConfig | str | int,
    members: Mapping[str, Member],
    *,
    replay: Member | None = None,
) -> StagePlan:
    """Rates and seed of one stage of a RunConfig (`stage`: a StageConfig, its name or index).

    With `replay`, the replay member gets `replay.share`; with share null it gets what its tasks not
    trained in this stage would get by the temperature rule over old and new tasks (full sizes).
    """
    stages = cfg.stage_list()
    if isinstance(stage, int):
        idx = stage
    else:
        names = [s.name for s in stages]
        sname = stage if isinstance(stage, str) else stage.name
        if sname not in names:
            raise ConfigError(
                [
                    Problem(
                        cfg.config_path or "<config>",
                        None,
                        f"unknown stage '{sname}'",
                        did_you_mean(sname, names),
                    )
                ]
            )
        idx = names.index(sname)
    st = stages[idx]
    mix = cfg.mixing
    temp = st.temperature if st.temperature is not None else mix.temperature
    tcfg = {n: t for n, t in zip(cfg.task_names(), cfg.tasks)}
    ms = [members[n] for n in st.tasks]
    sizes = effective_sizes(ms, mix.unit, mix.cap)
    shares: dict[str, float] = {}
    try:
        if replay is not None:
            ms.append(replay)
            sizes.update(effective_sizes([replay], mix.unit, mix.cap))
            if cfg.replay.share is not None:
                shares[replay.name] = float(cfg.replay.share)
            else:
                old = [
                    t for t in replay.info.get("tasks", []) if t not in st.tasks and t in members
                ]
                both = mixing_rates(
                    effective_sizes([members[t] for t in st.tasks + old], mix.unit, mix.cap), temp
                )
                shares[replay.name] = sum(both[t] for t in old)
        rates = mixing_rates(
            sizes,
            temp,
            weights={n: tcfg[n].weight for n in st.tasks},
            floors={n: tcfg[n].floor for n in st.tasks},
            ceilings={n: tcfg[n].ceiling for n in st.tasks},
            shares=shares,
        )
    except ConfigError as e:  # name the config file and stage the user can fix
        raise ConfigError(
            [
                Problem(
                    cfg.config_path or p.file, p.line, f"stage '{st.name}': {p.message}", p.hint
                )
                for p in e.problems
            ]
        ) from None
    base = mix.seed if mix.seed is not None else cfg.seed
    return StagePlan(st.name, idx, temp, ms, sizes, rates, derive_seed(base, idx))


def offer_stage_records(buffer: ReplayBuffer, plan: StagePlan, n: int) -> int:
    """Offer the first `n` records of a stage's stream (what it trained on: `stage_records`) to
    the replay buffer; returns how many it kept. The one offering code of training and of the
    `t2t-mtl mix` preview, so both build the same buffer.

    Draws the buffer ignores anyway (replayed records, upsampled repeats with mix_epoch > 0) are
    skipped without rendering; the others are rendered exactly as the stream renders them.
    """
    stream = plan.stream()
    kept = 0
    for _ in range(n):
        i, row, epoch = stream.next_index()
        if epoch > 0 or stream.members[i].info.get("source", "task") == "replay":
            continue
        kept += buffer.add(stream.render(i, row, epoch))
    return kept


def _default_variants(cfg: RunConfig, tmpl: Task) -> list[str] | None:
    """The variants a task without `variants` trains on: None (all) or, with
    `train.prompt_variants: first`, its first training variant."""
    if cfg.train.prompt_variants == "first" and tmpl.train_variants():
        return [tmpl.train_variants()[0].id]
    return None


def build_members(
    cfg: RunConfig,
    names: Sequence[str] | None = None,
    *,
    split: str = "train",
    count: Callable[[str], int] | None = None,
    token_sample: int = 2000,
) -> dict[str, Member]:
    """Members for the run's tasks (all, or `names`): rows load lazily, records render on demand.

    Source paths resolve like `RunConfig.resolve_path`. Problems of every task are raised together;
    a task whose rows are all bad is one (at the map or field that makes them so).
    """
    extra = [cfg.resolve_path(d) for d in cfg.template_dirs]
    out: dict[str, Member] = {}
    problems: list[Problem] = []
    for i, (name, tc) in enumerate(zip(cfg.task_names(), cfg.tasks)):
        if names is not None and name not in names or not tc.template:
            continue  # no template: the config's own check reports it
        try:
            tmpl = catalogue.load_task(tc.template, extra_dirs=extra)
            tmpl = tmpl.trained_on(tc.variants or _default_variants(cfg, tmpl))
        except T2TError as e:  # an unknown name: at the config's template key
            problems += [
                cfg.problem(("tasks", i, "template"), f"tasks[{i}].template: {p.message}", p.hint)
                if p.file == "<tasks>"
                else p
                for p in e.problems
            ]
            continue
        try:
            src = cfg.resolved_source(tc)
            rows = sources.load_rows(  # max_examples: a seeded random subset, not the first
                tmpl,
                src,
                split,
                bad_rows=cfg.train.bad_rows,
                limit=tc.max_examples,
                seed=f"{cfg.seed}|{name}",
            )
        except T2TError as e:  # a source folder without the split's file: at the config's path
            problems += [
                cfg.problem(
                    ("tasks", i, "source", "path"),
                    f"tasks[{i}].source.path: {src.path}: {p.message}",
                    p.hint,
                )
                if src is not None and src.path and p.file == src.path and p.line is None
                else p
                for p in e.problems
            ]
            continue
        if rows.all_bad:
            source_at = catalogue.config_source_at(cfg, i, tmpl)
            problems += [catalogue.all_bad_rows_problem(tmpl, rows, source_at)]
            problems += rows.problems[:3]
            continue
        get = _renderer(tmpl, rows, split, name)
        tokens, exact = measure_tokens(len(rows), get, count, token_sample)
        out[name] = Member(
            name,
            len(rows),
            tokens,
            get,
            exact,
            skipped=rows.skipped,
            info={
                "template": tmpl.name,
                "template_version": tmpl.version,
                "task_type": tmpl.task_type,
                "label_task": tmpl.is_label_task,
                "bad_rows": rows.summary(),
            },
        )
    if problems:
        raise T2TError(problems)
    return out


def _renderer(
    tmpl: Task, rows: sources.Rows, split: str, name: str
) -> Callable[[int, int], Record]:
    def get(i: int, epoch: int) -> Record:
        rec = sources.render_row(
            tmpl, rows, i, row_id=str(i), split=split, epoch=epoch
        )  # row id = index, as catalogue.task_records
        if rec.task != name:  # a renamed task (TaskConfig.name) keeps its own name in records
            rec = dataclasses.replace(rec, task=name)
        return rec

    return get
