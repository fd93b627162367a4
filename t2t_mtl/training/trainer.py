"""`train(cfg)`: tasks -> mixture (+ replay) -> features -> model -> accelerate loop -> run folder.

`accelerate launch launch/train.py --config CFG [k=v ...]` and `t2t-mtl train --config CFG [k=v ...]`
both call `train`. Order of work:
1. `preflight.check_run`: every cheap check at once (config, templates, sources, model, device options);
2. the `_Trainer._setup_*` steps: accelerator, run folder, model (LoRA / QLoRA / full,
   `model.loading`), prompt format and packing, optimiser and `accelerator.prepare` (DDP / FSDP /
   DeepSpeed come from the accelerate config), step runner, telemetry, collator and replay buffer;
3. resume from the last complete checkpoint (`train.resume: auto`), including the stream position;
4. per stage: plan the mixture (with the replay member after the first stage), feed windows
   (`batching`; the next ones built in a background thread, `train.prefetch`) to
   `optimizer_step.StepRunner`, log (`telemetry`), checkpoint (`checkpointing`), call
   the evaluation hook every `eval.every_steps`; at the stage end save `stages/<name>/adapter`, offer
   the stage's records to the replay buffer (`mixture.offer_stage_records`, as `t2t-mtl mix`
   previews it) and save it; when a later stage sets `ewc`, estimate the stage's Fisher
   (`protection`, RUN/ewc/); the freezing schedule (`protection.LayerSchedule`) sets which blocks
   train before every step;
5. save the final bundle `adapter/` (with `t2t_manifest.json`), `loss_curves.png`, `train_summary.json`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LRScheduler

from t2t_mtl.core.config import RunConfig, config_notes, config_to_dict
from t2t_mtl.core.errors import Problem, T2TError
from t2t_mtl.core.files import atomic_write_json
from t2t_mtl.core.records import Record
from t2t_mtl.evaluation import evaluator
from t2t_mtl.mixing import mixture, replay
from t2t_mtl.mixing.mixture import Member
from t2t_mtl.model import features, layers, loading
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.runs.folder import (
    clear_previous,
    config_changes,
    copy_templates,
    mixture_entry,
    task_manifest,
    trim_metrics,
    write_config,
    write_mixture,
)
from t2t_mtl.tasks.task import Task
from t2t_mtl.training import checkpointing, losses, preflight, protection
from t2t_mtl.training.batching import Batcher, Prefetcher, Window
from t2t_mtl.training.optimizer_step import (
    StepResult,
    StepRunner,
    load_scheduler_state,
    make_optimizer,
    make_scheduler,
    restore_4bit_for_training,
    scheduler_state,
)
from t2t_mtl.training.telemetry import (
    MetricWindow,
    Telemetry,
    plot_loss_curves,
    read_metrics,
    tracker_setup,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

RESOURCE_HINT = (
    "lower train.batch_size (raise train.grad_accum to keep the effective batch), lower "
    "model.max_length, set train.gradient_checkpointing=true, or use adapter.method=qlora"
)


@dataclass
class EvalContext:
    """What the evaluation hook gets every `eval.every_steps` (all processes call it)."""

    accelerator: Accelerator
    # unwrapped (sharded models: the wrapped one, `preflight.generation_model`), in eval mode
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    prompt_format: PromptFormat
    family: str
    cfg: RunConfig
    run_dir: Path
    stage: str
    step: int


EvalFn = Callable[[EvalContext], dict | None]
StepHook = Callable[[int, dict], None]


def train(
    cfg: RunConfig, *, eval_fn: EvalFn | None | str = "auto", on_step: StepHook | None = None
) -> Path:
    """Train per `cfg`; returns the run folder.

    `eval_fn` is the evaluation hook, called every `eval.every_steps` with an `EvalContext`; its scalars
    are logged as eval/<key>. "auto" = `evaluator.training_eval_fn(cfg)` when `eval.every_steps` > 0
    (its eval data is read now, so a missing split fails before training), None = no evaluation.
    `on_step(step, info)` runs after every optimiser step (`info`: stage, stage_step, records of this
    process, objective).
    """
    t0 = time.time()
    loading.quiet_library_noise()
    members, templates = preflight.check_run(cfg)
    for note in config_notes(cfg):  # valid settings that do nothing in this run
        logger.warning("%s", note)
    _log_bad_rows(members)
    if eval_fn == "auto":
        eval_fn = evaluator.training_eval_fn(cfg) if cfg.eval.every_steps else None
    trainer = _Trainer(cfg, members, templates, eval_fn, on_step, t0)
    try:
        return trainer.run()
    finally:
        trainer.telemetry.close()
        _end_distributed()


def _log_bad_rows(members: dict[str, Member]) -> None:
    """Say how many bad rows each task's training data had (always, as `t2t-mtl mix` does), with the
    first one of each task that had some (`file:row: message`). Once, from the first process."""
    if os.environ.get("RANK", "0") != "0":
        return
    logger.info("bad rows skipped: " + ", ".join(f"{n} {m.skipped}" for n, m in members.items()))
    for m in members.values():
        if m.skipped and m.info.get("bad_rows"):
            logger.info("  " + m.info["bad_rows"])


def _end_distributed() -> None:
    """Tear the process group down explicitly: left to interpreter exit, gloo's worker threads are
    destroyed while still joinable and a rank can abort ("terminate called without an active exception")
    after training has already finished."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _fresh_accelerator_state(mixed: str) -> None:
    """Let a second run in the same single process train with another precision: accelerate keeps
    one process-wide state whose mixed precision cannot change (a ValueError at `Accelerator()`),
    so a notebook or a benchmark that trains a float32 run and then a bf16 one would fail. Only a
    single process: under a launcher the state is the launcher's and is never reset."""
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not AcceleratorState._shared_state:
        return
    if str(AcceleratorState._shared_state.get("_mixed_precision", mixed)) != mixed:
        AcceleratorState._reset_state()


class _Trainer:
    """One training run: the prepared model and everything that lives across stages.

    `__init__` runs the setup steps in order; each `_setup_*` sets the attributes it names.
    """

    def __init__(
        self,
        cfg: RunConfig,
        members: dict[str, Member],
        templates: dict[str, Task],
        eval_fn: EvalFn | None,
        on_step: StepHook | None,
        t0: float,
    ):
        self.cfg, self.tr = cfg, cfg.train
        self.members, self.eval_fn, self.on_step, self.t0 = members, eval_fn, on_step, t0
        self.task_names = cfg.task_names()
        self.task_index = {n: i for i, n in enumerate(self.task_names)}
        self._setup_accelerator()
        self._setup_run_folder()
        model = self._setup_model()
        self._setup_optimizer(model)
        self._setup_packing()
        self._setup_step_runner()
        self._setup_telemetry(templates)
        self._setup_data()
        self.global_step = 0
        self.session = {"steps": 0, "loop_seconds": 0.0, "input_tokens": 0.0, "target_tokens": 0.0}

    # ------------------------------------------------------------------ setup

    def _setup_accelerator(self) -> None:
        """`acc` (gradient accumulation; DDP / FSDP / DeepSpeed from the accelerate config; the
        installed trackers of train.report_to, `telemetry.tracker_setup`), `main`, `tracker_notes`."""
        log_with, project, self.tracker_notes = tracker_setup(
            self.tr.report_to, Path(self.cfg.output_dir).expanduser()
        )
        preflight.deepspeed_launch_env(self.cfg)
        mixed = preflight.mixed_precision(self.cfg)
        _fresh_accelerator_state(mixed)
        self.acc = Accelerator(
            gradient_accumulation_steps=self.tr.grad_accum,
            cpu=preflight.cpu_processes(),
            mixed_precision=mixed,
            kwargs_handlers=_ddp_kwargs(self.cfg),
            log_with=log_with or None,
            project_config=project,
        )
        preflight.fsdp_on_cpu(self.acc)  # launch/accelerate/cpu_fsdp.yaml (FSDP2 over gloo)
        self.main = self.acc.is_main_process

    def _setup_run_folder(self) -> None:
        """`run_dir`, `ckpt` (the checkpoint to resume, or None). The main process clears a previous
        run's files on a fresh start, or notes changed settings and trims metrics.jsonl to the
        checkpoint on resume; every process waits for it."""
        run_dir = self.run_dir = Path(self.cfg.output_dir).expanduser()
        self.ckpt = checkpointing.resume_point(self.tr.resume, run_dir, self.cfg.resolve_path)
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.ckpt is None:
                clear_previous(run_dir)
            else:
                changed = config_changes(run_dir, self.cfg)
                if changed:
                    logger.warning(
                        "note: resuming %s with changed settings: %s", self.ckpt, ", ".join(changed)
                    )
                trim_metrics(run_dir, checkpointing.read_state(self.ckpt)["global_step"])
        self.acc.wait_for_everyone()

    def _setup_model(self) -> torch.nn.Module:
        """`tok`, `family`, `fmt` (prompt format), `packing_layout` (the packed layout the model's
        attention keeps apart); returns the model (not yet prepared), with the same adapter
        initialisation on every process."""
        cfg = self.cfg
        set_seed(cfg.seed)
        try:
            model, self.tok, self.family = loading.load_model_and_tokenizer(
                cfg.model,
                cfg.adapter,
                for_training=True,
                gradient_checkpointing=self.tr.gradient_checkpointing,
                reentrant_checkpointing=preflight.deepspeed_zero3(),
            )
        except torch.OutOfMemoryError:
            raise T2TError(
                Problem.at("<train>", "out of memory while loading the model", RESOURCE_HINT)
            ) from None
        self.fmt = PromptFormat.for_tokenizer(
            self.tok, self.family, cfg.model.prompt_format, cfg.model.truncation
        )
        self.packing_layout = features.packing_layout(
            getattr(model.config, "_attn_implementation", None)
        )
        layers.mark_trainable(model)  # what the optimiser holds, even while a block is frozen
        return model

    def _setup_optimizer(self, model: torch.nn.Module) -> None:
        """`model`, `optimizer`: built and passed through `accelerator.prepare`, with checkpoint
        hooks; then per-process seeds (dropout differs between processes)."""
        optimizer = make_optimizer(
            model,
            self.tr.learning_rate,
            self.tr.weight_decay,
            self.tr.layer_lr_decay,
            optim=self.tr.optim,
        )
        preflight.configure_deepspeed(self.acc, self.cfg)
        preflight.configure_fsdp(self.acc, model)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        checkpointing.install_hooks(self.acc)
        set_seed(self.cfg.seed, device_specific=True)

    def _setup_packing(self) -> None:
        """`packing`: whether causal batches are packed (train.packing auto/on). Decided on the
        prepared model (its device, dtype and autocast) by `features.packing_check`, on every
        process, and only when all pass; otherwise training pads, with a log line saying why."""
        self.packing = False
        if self.family != "causal" or self.tr.packing == "off":
            return
        collator = features.CausalCollator(
            self.tok.pad_token_id,
            packing=True,
            max_length=self.cfg.model.max_length,
            layout=self.packing_layout,
        )
        ok, why = features.packing_check(self.model, collator, self.acc.device)
        failed = self.acc.reduce(torch.tensor([float(not ok)], device=self.acc.device), "sum")
        self.packing = float(failed.item()) == 0
        if not self.packing and self.main:
            logger.warning(
                "train.packing=%s: packed examples would not stay apart on this model (%s); "
                "training with padding instead (same losses, slower)",
                self.tr.packing,
                why or "the check failed on another process",
            )

    def _setup_step_runner(self) -> None:
        """`balancer` (train.loss_balancing), `runner` (one optimiser step), `window` (metrics)."""
        tr = self.tr
        self.balancer = losses.make_balancer(
            tr.loss_balancing,
            self.task_names,
            [t.loss_weight for t in self.cfg.tasks],
            tr.gradnorm_alpha,
        )
        self.runner = StepRunner(
            self.acc,
            self.model,
            self.optimizer,
            self.balancer,
            self.task_names,
            self.family,
            tr.max_grad_norm,
            gradient_surgery=tr.gradient_surgery,
            seed=self.cfg.seed,
        )
        self.window = MetricWindow(self.task_names)
        self.layer_schedule = protection.LayerSchedule(self.cfg, self.acc.unwrap_model(self.model))

    def _setup_telemetry(self, templates: dict[str, Task]) -> None:
        """`telemetry`, `manifest_extra` (what every saved bundle's manifest adds). The main process
        copies the templates and writes config.yaml first; the model summary line is logged."""
        cfg, acc = self.cfg, self.acc
        copies = copy_templates(self.run_dir, templates) if self.main else {}
        if self.main:
            write_config(self.run_dir, cfg)
        self.telemetry = Telemetry(
            self.run_dir,
            enabled=self.main,
            accelerator=acc,
            run_name=cfg.run_name,
            config=config_to_dict(cfg),
            resume_step=(
                None if self.ckpt is None else checkpointing.read_state(self.ckpt)["global_step"]
            ),
        )
        for note in self.tracker_notes + self.telemetry.notes:
            self.telemetry.write(f"note: {note}")
        trainable, total = loading.trainable_parameters(acc.unwrap_model(self.model))
        self.telemetry.write(
            f"model {cfg.model.name} ({self.family}, {cfg.adapter.method}): {trainable:,} of {total:,} parameters "
            f"train; prompt format {self.fmt.kind}; packing {self._packing_note()}; "
            f"{acc.num_processes} process(es) on {acc.device}"
        )
        self.manifest_extra = {
            "run_name": cfg.run_name,
            "tasks": task_manifest(cfg, templates, copies),
            "templates_dir": "templates",
            "max_length": cfg.model.max_length,
            "max_target_length": cfg.model.max_target_length,
        }

    def _packing_note(self) -> str:
        if not self.packing:
            return "off"
        if self.packing_layout == "flat":
            return "on (one row per micro-batch: flash-attention varlen)"
        return "on (rows of max_length, block-diagonal attention)"

    def _setup_data(self) -> None:
        """`collate` (the family's collator, packing or not) and `buf` (the replay buffer, or None)."""
        cfg, pad = self.cfg, self.tok.pad_token_id
        # Seq2seq widths in buckets (sources of 64 tokens, targets of 8, capped at the model's
        # lengths): length-grouped T5 batches changed shape at every step, and on the GPU each
        # new shape likely cost cuDNN a new attention plan (6 ms of CPU per call; docs/benchmarks.md,
        # GPU section); a few shapes are planned, allocated and cached once. Targets get a finer
        # step: label answers are a few tokens, and a decoder padded to 64 would do ten times
        # their work.
        self.collate = (
            features.Seq2SeqCollator(
                pad,
                pad_to_multiple_of=64,
                label_pad_to_multiple_of=8,
                max_length=cfg.model.max_length,
                max_target_length=cfg.model.max_target_length,
            )
            if self.family == "seq2seq"
            else features.CausalCollator(
                pad,
                packing=self.packing,
                max_length=cfg.model.max_length,
                layout=self.packing_layout,
            )
        )
        label_tasks = [n for n, m in self.members.items() if m.info.get("label_task")]
        self.buf: replay.ReplayBuffer | None = (
            replay.buffer_for_run(cfg, label_tasks) if cfg.replay.enabled else None
        )

    # ------------------------------------------------------------------ run

    def encode(self, rec: Record) -> dict:
        """Features of one record (completion-only labels, the record's task index)."""
        return features.encode(
            rec,
            self.tok,
            self.fmt,
            self.cfg.model.max_length,
            self.cfg.model.max_target_length,
            task_index=self.task_index[rec.task],
        )

    def run(self) -> Path:
        """All stages from the resume point on, then the final bundle and reports."""
        state: dict = {}
        if self.ckpt is not None:
            state = checkpointing.load(self.acc, self.ckpt)
            self.balancer.load_state_dict(state["balancer"])
            self.window.load_state_dict(state["window"])
            if state.get("replay") is not None:
                self.buf = replay.ReplayBuffer.from_state(state["replay"])
            self.global_step = int(state["global_step"])
            self.telemetry.write(f"resuming from {self.ckpt} (step {self.global_step})")
        stages = self.cfg.stage_list()
        for si in range(int(state.get("stage_index", 0)), len(stages)):
            self._stage(si, state if state and si == int(state["stage_index"]) else None)
        self._save_bundle(self.run_dir / "adapter", stages[-1].name)
        sums = _weight_checksum(self.acc.unwrap_model(self.model)).to(self.acc.device)
        if preflight.sharded_model(self.acc):  # each process holds shards: sum them
            sums = self.acc.reduce(sums, "sum")
        sums = self.acc.gather(sums).cpu().tolist()
        if self.main:
            png = plot_loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curves.png")
            _write_summary(
                self.run_dir,
                self.global_step,
                time.time() - self.t0,
                sums,
                self.acc.num_processes,
                self.session,
            )
            self.telemetry.write(
                f"done in {time.time() - self.t0:.0f} s: {self.run_dir / 'adapter'}"
                + (f"; loss curves {png}" if png else "")
            )
        return self.run_dir

    def _stage(self, si: int, resume: dict | None) -> None:
        cfg, tr, st = self.cfg, self.tr, self.cfg.stage_list()[si]
        plan = mixture.plan_stage(cfg, si, self.members, replay=mixture.stage_replay(self.buf))
        if self.main:
            write_mixture(self.run_dir, mixture_entry(plan, cfg))
        seq2seq = self.family == "seq2seq"
        batcher = Batcher(
            plan.stream(),
            encode=self.encode,
            collate=self.collate,
            batch_size=tr.batch_size,
            grad_accum=tr.grad_accum,
            world_size=self.acc.num_processes,
            rank=self.acc.process_index,
            group_by_length=seq2seq and tr.group_by_length,
            seq2seq=seq2seq,
            total_steps=st.steps,
        )
        # A stage may peak lower than train.learning_rate (a common guard against forgetting).
        peak = st.learning_rate if st.learning_rate is not None else tr.learning_rate
        sched = make_scheduler(self.optimizer, tr.scheduler, tr.warmup_steps, st.steps, peak)
        if tr.warmup_steps >= st.steps and resume is None:
            self.telemetry.write(
                f"note: train.warmup_steps {tr.warmup_steps} >= the {st.steps} steps of "
                + (f"stage {st.name}" if len(cfg.stage_list()) > 1 else "this run")
                + f": the learning rate never reaches its peak {peak:g} (lower warmup_steps)"
            )
        first = 0
        if resume is not None:
            batcher.load_state(resume["batcher"])
            load_scheduler_state(sched, resume["scheduler"])
            first = int(resume["stage_step"])
        self.runner.ewc = self._ewc_penalty(si)
        self.telemetry.progress(
            st.steps, first, f"stage {st.name}" if len(cfg.stage_list()) > 1 else "train"
        )
        # Window s + 1 is rendered, tokenised and collated while step s runs; each comes with
        # the batcher state after it, which is what a checkpoint after that step saves.
        feed = Prefetcher(batcher, st.steps - first, tr.prefetch, self._prepare_window())
        self.window.started = time.time()
        try:
            for s in range(first, st.steps):
                self._step(si, s, feed, sched)
        finally:
            feed.close()
        self.telemetry.close_bar()
        self._save_bundle(self.run_dir / "stages" / st.name / "adapter", st.name)
        if protection.fisher_needed(cfg, si):
            self._estimate_fisher(si, plan)
        if self.buf is not None and si < len(cfg.stage_list()) - 1:
            n = mixture.stage_records(cfg, si, self.acc.num_processes)
            kept = mixture.offer_stage_records(self.buf, plan, n)
            if self.main:
                self.buf.save(self.run_dir)
            self.telemetry.write(
                f"replay: kept {kept} new record(s) from stage {st.name}; buffer {self.buf.counts()}"
            )

    def _prepare_window(self) -> Callable[[Window], Window] | None:
        """What the prefetcher does to a window after building it: on a GPU, its tensors go to
        pinned host memory, so the step copies them to the device without waiting."""
        if self.acc.device.type != "cuda":
            return None

        def pin(w: Window) -> Window:
            w.micro = [{k: v.pin_memory() for k, v in m.items()} for m in w.micro]
            return w

        return pin

    def _step(self, si: int, s: int, feed: Prefetcher, sched: LRScheduler) -> None:
        tr, st = self.tr, self.cfg.stage_list()[si]
        t = time.time()
        window, position = feed.get()  # position: the batcher's state after this window
        if self.layer_schedule.apply(si, s) and protection.dynamic_freezing(self.cfg):
            rng = self.layer_schedule.current
            self.telemetry.write(
                f"step {self.global_step + 1}: "
                + (f"blocks {rng[0]}..{rng[1]} train" if rng else "every block trains")
            )
        try:
            res = self.runner.run(window, step=self.global_step + 1)
        except torch.OutOfMemoryError:
            raise T2TError(
                Problem.at(
                    "<train>",
                    f"out of memory at step {self.global_step + 1} (batch_size {tr.batch_size}, "
                    f"max_length {self.cfg.model.max_length})",
                    RESOURCE_HINT,
                )
            ) from None
        if not res.finite:
            raise _nonfinite(res, self.global_step + 1, st.name, window, self.run_dir)
        lr = sched.get_last_lr()[0]
        sched.step()
        self.global_step += 1
        step = self.global_step
        for key, v in (
            ("steps", 1),
            ("loop_seconds", time.time() - t),
            ("input_tokens", res.input_tokens),
            ("target_tokens", float(res.tokens.sum())),
        ):
            self.session[key] += v
        self.window.add(
            res.objective, res.sums.tolist(), res.tokens.tolist(), window.records, res.input_tokens
        )
        self.telemetry.advance({"loss": f"{res.objective:.4f}"})
        last = s == st.steps - 1
        if step % tr.logging_steps == 0 or last:
            row = {**self.window.row(), "lr": lr, "stage_step": s + 1}
            if res.ewc_penalty is not None:
                row["ewc_penalty"] = res.ewc_penalty  # at this step, before its update
            if res.grad_norm is not None:
                row["grad_norm"] = res.grad_norm
            row.update({f"weight/{k}": v for k, v in self.balancer.weights().items()})
            self.telemetry.log(step, row, stage=st.name)
            self.window.reset()
        if (
            self.eval_fn is not None
            and self.cfg.eval.every_steps
            and step % self.cfg.eval.every_steps == 0
        ):
            with feed.paused():  # the tokenizer is not for two threads at once
                self._eval(st.name)
        if step % tr.save_steps == 0 or last:  # a stage always ends with a checkpoint
            checkpointing.save(
                self.acc,
                self.run_dir,
                step,
                {
                    "global_step": step,
                    "stage_index": si,
                    "stage": st.name,
                    "stage_step": s + 1,
                    "batcher": position,
                    "scheduler": scheduler_state(sched),
                    "balancer": self.balancer.state_dict(),
                    "window": self.window.state_dict(),
                    "replay": self.buf.state() if self.buf is not None else None,
                },
                tr.save_total_limit,
            )
        if self.on_step is not None:
            with feed.paused():
                self.on_step(
                    step,
                    {
                        "stage": st.name,
                        "stage_step": s + 1,
                        "records": window.keys,
                        "objective": res.objective,
                    },
                )

    def _ewc_penalty(self, si: int) -> protection.EwcPenalty | None:
        """Stage `si`'s EWC penalty, read from `RUN/ewc/after-<previous stage>` (None without
        `ewc`); read from the file in fresh and resumed runs alike."""
        stages = self.cfg.stage_list()
        ewc = stages[si].ewc
        if ewc is None:
            return None
        path = protection.ewc_file(self.run_dir, stages[si - 1].name)
        fisher, anchor = protection.load_ewc(path, self.acc.device)
        self.telemetry.write(
            f"ewc: stage {stages[si].name} is held near the weights after stage "
            f"{stages[si - 1].name} (lambda {ewc.lam:g}, {path})"
        )
        named = layers.trainable_named(self.acc.unwrap_model(self.model))
        return protection.EwcPenalty(named, fisher, anchor, ewc.lam)

    def _estimate_fisher(self, si: int, plan: mixture.StagePlan) -> None:
        """The online Fisher after stage `si` and its anchor (the weights now) ->
        `RUN/ewc/after-<stage>.safetensors` (see `protection`). Every process estimates from its
        share of the stage's first `samples` records (record j on process j mod N); the sums are
        all-reduced. Deterministic, so a run resumed at the stage's end writes the same file."""
        cfg, stages = self.cfg, self.cfg.stage_list()
        st, ewc, t = stages[si], protection.stage_ewc(cfg, si), time.time()
        stream = plan.stream()
        n, rank = self.acc.num_processes, self.acc.process_index

        def batches():
            for j in range(ewc.samples):
                if j % n == rank:
                    yield self.collate([self.encode(next(stream))])
                else:
                    stream.next_index()

        inner = self.acc.unwrap_model(self.model)
        named = layers.trainable_named(inner)
        sums = protection.estimate_fisher(self.runner, inner, named, batches(), cfg.seed + si)
        flat = self.acc.reduce(torch.cat([v.flatten() for v in sums.values()]), "sum")
        flat = flat / ewc.samples
        fisher, offset = {}, 0
        for name, v in sums.items():
            fisher[name] = flat[offset : offset + v.numel()].view_as(v)
            offset += v.numel()
        if si > 0:  # online EWC: F <- gamma * F_old + F_new (the file exists: see fisher_needed)
            old, _ = protection.load_ewc(
                protection.ewc_file(self.run_dir, stages[si - 1].name), self.acc.device
            )
            fisher = {k: ewc.gamma * old[k] + v for k, v in fisher.items()}
        path = protection.ewc_file(self.run_dir, st.name)
        if self.main:
            meta = {
                "stage": st.name,
                "stages": [s.name for s in stages[: si + 1]],
                "samples": ewc.samples,
                "gamma": ewc.gamma,
            }
            protection.save_ewc(path, fisher, {k: p for k, p in named}, meta)
            self.telemetry.write(
                f"ewc: Fisher of stage {st.name} from {ewc.samples} record(s) in "
                f"{time.time() - t:.1f} s: {path}"
            )
        self.acc.wait_for_everyone()

    def _eval(self, stage: str) -> None:
        model, gathered = preflight.generation_model(self.acc, self.model)
        ctx = EvalContext(
            self.acc,
            model,
            self.tok,
            self.fmt,
            self.family,
            self.cfg,
            self.run_dir,
            stage,
            self.global_step,
        )
        self.model.eval()
        try:
            with gathered:
                result = self.eval_fn(ctx) or {}
        finally:
            self.model.train()
            restore_4bit_for_training(self.model)
        scalars = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
        if scalars:
            self.telemetry.log(self.global_step, scalars, stage=stage)
        score = result.get("combined")
        if (
            self.cfg.eval.select_best
            and isinstance(score, (int, float))
            and score > self._best_score()
        ):
            # Every process got the same result, so all of them reach _save_bundle's barrier together.
            self._save_bundle(self.run_dir / "best" / "adapter", stage)
            if self.main:
                info = {"step": self.global_step, "stage": stage, "combined": float(score)}
                atomic_write_json(self.run_dir / "best" / "best.json", info, indent=1, end="")
                self.telemetry.write(
                    f"new best combined score {score:.2f} at step {self.global_step}: "
                    f"{self.run_dir / 'best' / 'adapter'}"
                )
            self.acc.wait_for_everyone()

    def _best_score(self) -> float:
        """Combined eval score of the kept best bundle (read from disk, so a resumed run keeps it)."""
        f = self.run_dir / "best" / "best.json"
        return float(json.loads(f.read_text())["combined"]) if f.is_file() else float("-inf")

    def _save_bundle(self, folder: Path, stage: str) -> None:
        """Write a bundle (main process); all processes call it. A sharded model (FSDP, ZeRO-3) is
        saved from its gathered state dict, which every process helps to build."""
        state = self.acc.get_state_dict(self.model) if preflight.sharded_model(self.acc) else None
        if self.main:
            man = loading.bundle_manifest(
                self.cfg.model,
                self.cfg.adapter,
                self.family,
                self.fmt,
                step=self.global_step,
                stage=stage,
                **self.manifest_extra,
            )
            loading.save_adapter_bundle(
                self.acc.unwrap_model(self.model), self.tok, folder, man, state_dict=state
            )
        self.acc.wait_for_everyone()


# ------------------------------------------------------------------ helpers


def _nonfinite(res: StepResult, step: int, stage: str, window: Window, run_dir: Path) -> T2TError:
    last = checkpointing.latest_checkpoint(run_dir)
    in_batch = sorted(
        {t for m in window.tasks for t in m} | {k for k, v in window.records.items() if v}
    )
    what = "gradient norm" if res.grad_norm is not None else "loss"
    hint = (
        f"training stopped before the optimiser step; the last good checkpoint is {last}"
        if last
        else "training stopped before the optimiser step; no checkpoint was written yet"
    )
    return T2TError(
        Problem.at(
            "<train>",
            f"step {step} (stage '{stage}'): non-finite {what} for task(s) {', '.join(res.bad_tasks)}; "
            f"tasks in the batch: {', '.join(in_batch)}",
            hint
            + "; lower train.learning_rate, keep train.max_grad_norm > 0, or train in float32/bfloat16 "
            "rather than float16",
        )
    )


def _ddp_kwargs(cfg: RunConfig) -> list:
    """DDP must look for parameters without a gradient when a freezing schedule turns some off
    during the run (they were trainable when DDP wrapped the model)."""
    if not protection.dynamic_freezing(cfg):
        return []
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=True)]


def _weight_checksum(model: torch.nn.Module) -> torch.Tensor:
    """Σ|w| and Σw over trainable parameters (float64): equal on every process when they agree.
    Over this process's shards only for a sharded model (FSDP2 DTensors: their local part)."""
    ps = [
        (p.to_local() if hasattr(p, "to_local") else p).detach().double()
        for _, p in layers.trainable_named(model)
    ]
    return torch.tensor(
        [sum(float(p.abs().sum()) for p in ps), sum(float(p.sum()) for p in ps)],
        dtype=torch.float64,
    )[None]


def _write_summary(
    run_dir: Path, steps: int, seconds: float, checksums: list, processes: int, session: dict
) -> None:
    """`train_summary.json`: steps, wall time, this session's throughput, per-process weight checksums."""
    last = next((r for r in reversed(read_metrics(run_dir / "metrics.jsonl")) if "loss" in r), {})
    loop = max(session["loop_seconds"], 1e-9)
    summary = {
        "steps": steps,
        "seconds": round(seconds, 1),
        "processes": processes,
        "session": {
            **session,
            "tokens_per_s": session["input_tokens"] / loop,
            "target_tokens_per_s": session["target_tokens"] / loop,
        },
        "final_loss": last.get("loss"),
        "final_task_loss": {k[5:]: v for k, v in last.items() if k.startswith("loss/")},
        "weight_checksums": checksums,
    }
    atomic_write_json(Path(run_dir) / "train_summary.json", summary, indent=1)
