"""Replay buffer for staged (curriculum) training: reservoir samples of earlier stages' records.

Each task keeps a reservoir of at most `per_task` records filled by Algorithm R (Vitter 1985): the i-th
record offered for a task replaces slot j = h(seed, task, i) mod (i+1) when j < per_task, so after any
number of offers every offered record is in the buffer with equal probability, and the draw depends only
on (seed, task, i): the buffer is deterministic for a seed and its state is the reservoirs plus counts.
With `label_balanced`, label tasks (classification / NLI) keep one reservoir per label (record output)
and the task's quota is split evenly over the labels seen (a label with fewer records gives its unused
quota to the others), so rare classes are not starved.

Offering records as the model trains on them samples what it has actually seen: after each stage,
training and the `t2t-mtl mix` preview offer the records it trained on through one function,
`mixture.offer_stage_records`. Upsampled repeats are ignored (records with `mix_epoch` > 0 repeat a
row offered in epoch 0), as are records that already are replay (`source: replay`), so the reservoir
samples distinct rows.

On disk, inside the run folder: `replay/buffer.jsonl` (the selected records, plain text Records, so any
model family can replay them) and `replay/manifest.json` (tasks, counts, seed, template versions, and the
full resumable state). `mixture.replay_member(buffer)` makes it one more mixture Member, "replay".
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from t2t_mtl.core.errors import DataError, Problem
from t2t_mtl.core.files import atomic_write_json
from t2t_mtl.core.records import Record, read_jsonl, write_jsonl

if TYPE_CHECKING:  # type-only: mixture imports this module at run time
    from t2t_mtl.core.config import RunConfig
    from t2t_mtl.mixing.mixture import Member

__all__ = ["MANIFEST_VERSION", "ReplayBuffer", "buffer_for_run"]

MANIFEST_VERSION = 1
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of x (stateless reservoir draws)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key_id(seed: int, key: str) -> int:
    return _mix64((seed & _M64) ^ (zlib.crc32(key.encode("utf-8")) << 32))


class ReplayBuffer:
    """Per-task reservoirs (optionally per label) with a per-task quota; deterministic and resumable."""

    def __init__(
        self,
        per_task: int = 200,
        seed: int = 0,
        *,
        label_balanced: bool = False,
        label_tasks: Iterable[str] = (),
    ):
        self.per_task = int(per_task)
        self.seed = int(seed)
        self.label_balanced = bool(label_balanced)
        self.label_tasks = set(label_tasks)
        self._res: dict[str, list[Record]] = {}  # reservoir key ("task" or "task\tlabel") -> slots
        self._seen: dict[str, int] = {}  # reservoir key -> records offered so far
        self._ids: dict[str, int] = {}  # cached hash per key
        self.sizes: dict[
            str, float
        ] = {}  # task -> effective size, recorded for the share=None rule

    def _key(self, rec: Record) -> str:
        if self.label_balanced and rec.task in self.label_tasks:
            return f"{rec.task}\t{rec.output}"
        return rec.task

    def add(self, rec: Record) -> bool:
        """Offer one record (Algorithm R); False when ignored (repeat or replayed record) or not kept."""
        if (
            rec.meta.get("source") == "replay"
            or int(rec.meta.get("mix_epoch", 0) or 0) > 0
            or self.per_task <= 0
        ):
            return False
        key = self._key(rec)
        i = self._seen.get(key, 0)
        self._seen[key] = i + 1
        slots = self._res.setdefault(key, [])
        if i < self.per_task:
            slots.append(rec)
            return True
        kid = self._ids.get(key)
        if kid is None:
            kid = self._ids[key] = _key_id(self.seed, key)
        j = _mix64(kid ^ i) % (i + 1)
        if j < self.per_task:
            slots[j] = rec
            return True
        return False

    def extend(self, records: Iterable[Record]) -> int:
        """Offer many records; returns how many were kept."""
        return sum(self.add(r) for r in records)

    def fill(self, member: Member) -> int:
        """Offer every row of a mixing Member once (epoch 0, row order); fills without a training stream."""
        return sum(self.add(member.get(i, 0)) for i in range(member.size))

    def tasks(self) -> list[str]:
        """Tasks present in the buffer, sorted."""
        return sorted({k.split("\t", 1)[0] for k in self._res})

    def records(self, task: str | None = None) -> list[Record]:
        """The replay set (per-task quota, label-balanced when asked), in a deterministic order."""
        out = []
        for t in [task] if task else self.tasks():
            keys = sorted(k for k in self._res if k.split("\t", 1)[0] == t)
            quotas = _water_fill([len(self._res[k]) for k in keys], self.per_task)
            for k, q in zip(keys, quotas):
                slots = self._res[k]
                if q < len(slots):  # a seeded subset, so dropping extra labels' records is unbiased
                    pick = np.random.Generator(
                        np.random.PCG64([self.seed, 2, _key_id(0, k)])
                    ).permutation(len(slots))
                    slots = [slots[j] for j in sorted(pick[:q].tolist())]
                out.extend(slots)
        return out

    def counts(self) -> dict[str, int]:
        """Records per task in the replay set."""
        out: dict[str, int] = {}
        for r in self.records():
            out[r.task] = out.get(r.task, 0) + 1
        return out

    def seen(self) -> dict[str, int]:
        """Distinct records offered per task."""
        out: dict[str, int] = {}
        for k, n in self._seen.items():
            t = k.split("\t", 1)[0]
            out[t] = out.get(t, 0) + n
        return out

    # ------------------------------------------------------------ persistence

    def state(self) -> dict:
        """JSON-serialisable state: settings, offer counts and reservoir slots."""
        return {
            "version": MANIFEST_VERSION,
            "per_task": self.per_task,
            "seed": self.seed,
            "label_balanced": self.label_balanced,
            "label_tasks": sorted(self.label_tasks),
            "sizes": dict(self.sizes),
            "seen": dict(self._seen),
            "reservoirs": {k: [r.to_dict() for r in v] for k, v in self._res.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping) -> ReplayBuffer:
        """Inverse of `state()`: continuing to `add` gives the same buffer as never having stopped."""
        if state.get("version") != MANIFEST_VERSION:
            raise DataError(
                [
                    Problem(
                        "<replay>", None, f"unknown replay state version {state.get('version')!r}"
                    )
                ]
            )
        buf = cls(
            state["per_task"],
            state["seed"],
            label_balanced=state["label_balanced"],
            label_tasks=state.get("label_tasks", ()),
        )
        buf.sizes = dict(state.get("sizes", {}))
        buf._seen = {k: int(v) for k, v in state["seen"].items()}
        buf._res = {k: [Record.from_dict(d) for d in v] for k, v in state["reservoirs"].items()}
        return buf

    def save(self, run_dir: str | Path) -> Path:
        """Write `replay/buffer.jsonl` and `replay/manifest.json` under `run_dir`; returns the folder."""
        folder = Path(run_dir) / "replay"
        recs = self.records()
        write_jsonl(recs, folder / "buffer.jsonl")
        versions: dict[str, list] = {}
        for r in recs:
            v = r.meta.get("template_version")
            if v is not None and v not in versions.setdefault(r.task, []):
                versions[r.task].append(v)
        manifest = {
            "version": MANIFEST_VERSION,
            "tasks": self.tasks(),
            "counts": self.counts(),
            "seen": self.seen(),
            "seed": self.seed,
            "per_task": self.per_task,
            "label_balanced": self.label_balanced,
            "template_versions": versions,
            "state": self.state(),
        }
        atomic_write_json(folder / "manifest.json", manifest, indent=1, ensure_ascii=False)
        return folder

    @classmethod
    def load(cls, run_dir: str | Path) -> ReplayBuffer:
        """Load a buffer saved by `save` (from any run, whatever its model family)."""
        folder = Path(run_dir) / "replay"
        path = folder / "manifest.json"
        if not path.is_file():
            raise DataError(
                [
                    Problem(
                        str(path),
                        None,
                        "no replay manifest here",
                        "replay is saved after a stage when replay.enabled is true",
                    )
                ]
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            buf = cls.from_state(manifest["state"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                [Problem(str(path), None, f"unreadable replay manifest: {e}")]
            ) from None
        on_disk = [r.to_dict() for r in read_jsonl(folder / "buffer.jsonl")]
        if on_disk != [r.to_dict() for r in buf.records()]:
            raise DataError(
                [
                    Problem(
                        str(folder / "buffer.jsonl"),
                        None,
                        "buffer.jsonl does not match manifest.json",
                        "the files were edited separately; save the buffer again",
                    )
                ]
            )
        return buf


def _water_fill(available: list[int], quota: int) -> list[int]:
    """Split `quota` as evenly as possible over bins holding `available` items each."""
    take = [0] * len(available)
    left = quota
    open_bins = [i for i, a in enumerate(available) if a > 0]
    while left > 0 and open_bins:
        each, extra = divmod(left, len(open_bins))
        for n, i in enumerate(list(open_bins)):
            give = min(available[i] - take[i], each + (1 if n < extra else 0))
            take[i] += give
            left -= give
        open_bins = [i for i in open_bins if take[i] < available[i]]
    return take


def buffer_for_run(cfg: RunConfig, label_tasks: Iterable[str] = ()) -> ReplayBuffer:
    """The run's buffer from its RunConfig: `replay.per_task`, `replay.label_balanced`, seeded by the mixing seed."""
    base = cfg.mixing.seed if cfg.mixing.seed is not None else cfg.seed
    return ReplayBuffer(
        cfg.replay.per_task,
        seed=_mix64(int(base) ^ 0x7265706C6179),
        label_balanced=cfg.replay.label_balanced,
        label_tasks=label_tasks,
    )
