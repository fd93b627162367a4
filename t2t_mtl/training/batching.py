"""Micro-batches for one process from a stage's deterministic record stream (exactly resumable).

Every process walks the *same* `MixedStream`. Optimiser step s consumes one window of
`world_size × grad_accum` micro-batches of `batch_size` records; global micro-batch j of the window
goes to process `j % world_size`. A process renders and tokenises only its own records and skips
the others with `stream.next_index()` (no rendering), so the data a step sees does not depend on
where a run was interrupted, and `world 2 × accum 1` sees the same records per step as
`world 1 × accum 2`.

Length grouping (T5): windows are produced in chunks of `group_steps` steps; every process encodes
the whole chunk, `features.length_grouped_batches` sorts it into micro-batches of similar length
(seeded by stage seed and chunk number), and micro-batch j of the chunk goes to step
`j // (world × accum)` and process `j % world`. The resumable state is the stream position at the
start of the current chunk plus the number of windows already used from it.

`Prefetcher` builds the next window(s) in a background thread while the current step runs
(`train.prefetch`); each window comes with the batcher state right after it, which is what a
checkpoint taken after training on it saves, so resuming stays exact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from t2t_mtl.core.records import Record
from t2t_mtl.mixing.mixture import MixedStream, derive_seed
from t2t_mtl.model import features

if TYPE_CHECKING:
    import torch

__all__ = ["Batcher", "Prefetcher", "Window"]


@dataclass
class Window:
    """One optimiser step's data for this process."""

    micro: list[dict[str, torch.Tensor]]  # collated micro-batches (on CPU), grad_accum of them
    records: dict[str, int]  # records per mixture member in the whole window (all processes)
    tasks: list[list[str]]  # task names per micro-batch of this process (for error messages)
    keys: list[tuple] = field(
        default_factory=list
    )  # (task, row_id, variant, epoch) of this process's records
    input_tokens: int = 0  # tokens fed to the model by this process (source + target for seq2seq)


class Batcher:
    """Feeds one process its windows of a stage; `state()`/`load_state()` resume exactly."""

    def __init__(
        self,
        stream: MixedStream,
        *,
        encode: Callable[[Record], features.Features],
        collate: Callable[[list[features.Features]], dict[str, torch.Tensor]],
        batch_size: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        group_by_length: bool = False,
        group_steps: int = 16,
        seq2seq: bool = False,
        total_steps: int | None = None,
    ):
        self.stream = stream
        self.encode = encode
        self.collate = collate
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world = world_size
        self.rank = rank
        self.group = group_by_length
        self.group_steps = max(1, group_steps) if group_by_length else 1
        self.seq2seq = seq2seq
        self.total_steps = total_steps
        self._names = [m.name for m in stream.members]
        self._sources = [m.info.get("source", "task") for m in stream.members]
        self._chunk: list[Window] | None = None
        self._chunk_state: dict | None = None
        self._chunk_no = 0
        self._offset = 0

    # ------------------------------------------------------------ records

    def _render(self, i: int, row: int, epoch: int) -> Record:
        """The record `MixedStream.__next__` would return for this draw."""
        rec = self.stream.members[i].get(row, epoch)
        return dataclasses.replace(
            rec, meta={**rec.meta, "source": self._sources[i], "mix_epoch": epoch}
        )

    def _draw(self, n: int, render: bool, counts: dict[str, int]) -> list[Record]:
        out = []
        for _ in range(n):
            i, row, epoch = self.stream.next_index()
            counts[self._names[i]] = counts.get(self._names[i], 0) + 1
            if render:
                out.append(self._render(i, row, epoch))
        return out

    @staticmethod
    def _key(r: Record) -> tuple:
        return (r.task, r.meta.get("row_id"), r.meta.get("variant"), r.meta.get("mix_epoch"))

    # ------------------------------------------------------------- chunks

    def _plain_window(self) -> list[Window]:
        counts: dict[str, int] = {}
        mine: list[list[Record]] = []
        for j in range(self.world * self.grad_accum):
            own = j % self.world == self.rank
            recs = self._draw(self.batch_size, own, counts)
            if own:
                mine.append(recs)
        return [self._window(mine, counts)]

    def _grouped_chunk(self) -> list[Window]:
        per_step = self.world * self.grad_accum
        steps = self.group_steps
        if (
            self.total_steps is not None
        ):  # the stage's last chunk is shorter: it uses exactly the stage's records
            steps = max(1, min(steps, self.total_steps - self._chunk_no * self.group_steps))
        counts_all: dict[str, int] = {}
        recs = self._draw(steps * per_step * self.batch_size, True, counts_all)
        feats = [self.encode(r) for r in recs]
        lengths = [len(f["input_ids"]) + len(f["labels"]) for f in feats]
        order = features.length_grouped_batches(
            lengths,
            self.batch_size,
            window=len(recs),
            seed=derive_seed(self.stream.seed, 7, self._chunk_no),
        )
        out = []
        for s in range(steps):
            batches = order[s * per_step : (s + 1) * per_step]
            counts: dict[str, int] = {}
            for b in batches:
                for k in b:
                    name = self._member_of(recs[k])
                    counts[name] = counts.get(name, 0) + 1
            mine = [
                [recs[k] for k in b] for j, b in enumerate(batches) if j % self.world == self.rank
            ]
            out.append(
                self._window(
                    mine,
                    counts,
                    [
                        [feats[k] for k in b]
                        for j, b in enumerate(batches)
                        if j % self.world == self.rank
                    ],
                )
            )
        return out

    def _member_of(self, r: Record) -> str:
        return "replay" if r.meta.get("source") == "replay" and "replay" in self._names else r.task

    def _window(
        self,
        mine: list[list[Record]],
        counts: dict[str, int],
        feats: list[list[features.Features]] | None = None,
    ) -> Window:
        micro, tasks, keys, n_tok = [], [], [], 0
        for m, recs in enumerate(mine):
            fs = feats[m] if feats is not None else [self.encode(r) for r in recs]
            n_tok += sum(
                len(f["input_ids"]) + (len(f["labels"]) if self.seq2seq else 0) for f in fs
            )
            micro.append(self.collate(fs))
            tasks.append(sorted({r.task for r in recs}))
            keys.extend(self._key(r) for r in recs)
        return Window(micro, counts, tasks, keys, n_tok)

    # ------------------------------------------------------------ public

    def next_window(self) -> Window:
        """The next optimiser step's window for this process."""
        if self._chunk is None or self._offset >= len(self._chunk):
            self._chunk_state = self.stream.state()
            self._chunk_no = int(self._chunk_state["count"]) // self._chunk_records()
            self._chunk = self._grouped_chunk() if self.group else self._plain_window()
            self._offset = 0
        w = self._chunk[self._offset]
        self._offset += 1
        return w

    def _chunk_records(self) -> int:
        return self.group_steps * self.world * self.grad_accum * self.batch_size

    def state(self) -> dict:
        """Position at a step boundary: stream state at the current chunk's start + windows used from it."""
        if self._chunk is None or self._offset >= len(self._chunk):
            return {"stream": self.stream.state(), "offset": 0}
        return {"stream": self._chunk_state, "offset": self._offset}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()`: the next window is the one that followed when it was saved."""
        self.stream.load_state(state["stream"])
        self._chunk, self._offset = None, 0
        if int(state.get("offset", 0)):
            self.next_window()  # rebuild the chunk from its start ...
            self._offset = int(state["offset"])  # ... and skip the windows already trained on


class Prefetcher:
    """Hands out a batcher's next `count` windows, building up to `depth` of them ahead in a
    background thread while the main thread trains on the current one (`depth` 0: each window is
    built in `get`, as the loop did before).

    `get()` returns (window, state): `state` is `batcher.state()` right after that window was built,
    the position a checkpoint taken after training on it must save (the windows built ahead are not
    in it, so a resumed run builds them again). Never more than `count` windows are built (the
    stage's remaining steps), so a row the run would not train on is never rendered. An exception
    raised while building a window is raised by `get()` for that window, as the very object (same
    type, message and problems): at the step where building it in the loop would have raised it.
    `prepare(window)` runs in the thread too (pinning host memory for the copy to the GPU).
    `paused()` is a block during which no window is being built: the tokenizer and the templates
    are not for two threads at once (evaluation, user hooks). `close()` stops the thread after the
    window in progress; it is a daemon thread, so it never keeps the process alive (Ctrl-C, exit).
    """

    JOIN_SECONDS = 2.0  # how long `close` waits for a window in progress

    def __init__(
        self,
        batcher: Batcher,
        count: int,
        depth: int = 1,
        prepare: Callable[[Window], Window] | None = None,
    ):
        self.batcher, self.count, self.depth = batcher, max(0, count), max(0, depth)
        self.prepare = prepare
        self._given = 0
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # held while a window is built
        self._slots = threading.Semaphore(self.depth)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.depth and self.count:
            self._thread = threading.Thread(target=self._work, name="t2t-mtl-prefetch", daemon=True)
            self._thread.start()

    def _build(self) -> tuple[Window, dict]:
        w = self.batcher.next_window()
        state = copy.deepcopy(self.batcher.state())
        if self.prepare is not None:
            w = self.prepare(w)
        return w, state

    def _work(self) -> None:
        for _ in range(self.count):
            self._slots.acquire()
            if self._stop.is_set():
                return
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    item = self._build()
            except BaseException as e:  # handed to the main thread, raised there
                self._ready.put((None, None, e))
                return
            self._ready.put((*item, None))

    def get(self) -> tuple[Window, dict]:
        """The next window and the batcher state right after it."""
        if self._error is not None:
            raise self._error
        if self._given >= self.count:
            raise RuntimeError(f"all {self.count} window(s) were handed out")
        self._given += 1
        if self._thread is None:
            return self._build()
        w, state, err = self._ready.get()
        if err is not None:
            self._error = err
            raise err
        self._slots.release()
        return w, state

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A block during which no window is being built (the one in progress is finished first)."""
        with self._lock:
            yield

    def close(self) -> None:
        """Stop building windows; waits briefly for the window in progress. Idempotent."""
        self._stop.set()
        t, self._thread = self._thread, None
        if t is None:
            return
        self._slots.release()  # wakes a thread waiting for a free slot
        if t is not threading.current_thread():
            t.join(self.JOIN_SECONDS)
