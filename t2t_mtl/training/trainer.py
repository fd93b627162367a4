"""`train(cfg)`: tasks -> mixture (+ replay) -> features -> model -> accelerate loop -> run folder.

`accelerate launch launch/train.py --config CFG [k=v ...]` and `t2t-mtl train --config CFG [k=v ...]`
both call `train`. Order of work:
1. `preflight.check_run`: every cheap check at once (config, templates, sources, model, device options);
2. load the model (LoRA / QLoRA / full, `modeling`), pick the prompt format and packing, build the
   optimiser, `accelerator.prepare` (DDP / FSDP / DeepSpeed come from the accelerate config);
3. resume from the last complete checkpoint (`train.resume: auto`), including the stream position;
4. per stage: plan the mixture (with the replay member after the first stage), feed windows
   (`batching`) to `train_step.StepRunner`, log (`telemetry`), checkpoint (`checkpointing`), call the
   evaluation hook every `eval.every_steps`; at the stage end save `stages/<name>/adapter`, offer the
   stage's records to the replay buffer and save it;
5. save the final bundle `adapter/` (with `t2t_manifest.json`), `loss_curves.png`, `train_summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2t_mtl.core.config import RunConfig, config_to_dict
from t2t_mtl.core.errors import Problem, T2TError
from t2t_mtl.mixing import mixture, replay
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
from t2t_mtl.training.preflight import check_run

RESOURCE_HINT = (
    "lower train.batch_size (raise train.grad_accum to keep the effective batch), lower "
    "model.max_length, set train.gradient_checkpointing=true, or use adapter.method=qlora"
)


@dataclass
class EvalContext:
    """What the evaluation hook gets every `eval.every_steps` (all processes call it)."""

    accelerator: Any
    model: Any  # unwrapped, in eval mode during the call
    tokenizer: Any
    prompt_format: Any
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
    members, templates = check_run(cfg)
    if eval_fn == "auto":
        eval_fn = None
        if cfg.eval.every_steps:
            from t2t_mtl.evaluation import evaluator

            eval_fn = evaluator.training_eval_fn(cfg)
    trainer = _Trainer(cfg, members, templates, eval_fn, on_step, t0)
    try:
        return trainer.run()
    finally:
        trainer.telemetry.close()
        _end_distributed()


def _end_distributed() -> None:
    """Tear the process group down explicitly: left to interpreter exit, gloo's worker threads are
    destroyed while still joinable and a rank can abort ("terminate called without an active exception")
    after training has already finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


class _Trainer:
    """One training run: the prepared model and everything that lives across stages."""

    def __init__(
        self,
        cfg: RunConfig,
        members: dict,
        templates: dict,
        eval_fn: EvalFn | None,
        on_step: StepHook | None,
        t0: float,
    ):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from t2t_mtl.model import features, loading
        from t2t_mtl.model.prompt_format import PromptFormat
        from t2t_mtl.training import checkpointing, losses, preflight
        from t2t_mtl.training.optimizer_step import (
            StepRunner,
            make_optimizer,
            restore_4bit_for_training,
        )
        from t2t_mtl.training.telemetry import MetricWindow, Telemetry

        self.cfg, self.members, self.eval_fn, self.on_step, self.t0 = (
            cfg,
            members,
            eval_fn,
            on_step,
            t0,
        )
        tr = self.tr = cfg.train
        acc = self.acc = Accelerator(
            gradient_accumulation_steps=tr.grad_accum, cpu=preflight.cpu_processes()
        )
        self.main = acc.is_main_process
        run_dir = self.run_dir = Path(cfg.output_dir).expanduser()
        self.ckpt = checkpointing.resume_point(tr.resume, run_dir, cfg.resolve_path)
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if self.ckpt is None:
                clear_previous(run_dir)
            else:
                changed = config_changes(run_dir, cfg)
                if changed:
                    print(
                        f"note: resuming {self.ckpt} with changed settings: {', '.join(changed)}",
                        file=sys.stderr,
                    )
                trim_metrics(run_dir, checkpointing.read_state(self.ckpt)["global_step"])
        acc.wait_for_everyone()

        set_seed(cfg.seed)  # the same adapter initialisation on every process
        try:
            model, self.tok, self.family = loading.load_model_and_tokenizer(
                cfg.model,
                cfg.adapter,
                for_training=True,
                gradient_checkpointing=tr.gradient_checkpointing,
            )
        except torch.OutOfMemoryError:
            raise T2TError(
                _problem("out of memory while loading the model", RESOURCE_HINT)
            ) from None
        self.fmt = PromptFormat.for_tokenizer(
            self.tok, self.family, cfg.model.prompt_format, cfg.model.truncation
        )
        self.packing = self.family == "causal" and features.resolve_packing(tr.packing, model)
        restore_4bit_for_training(model)  # the packing probe ran in eval mode
        self.task_names = cfg.task_names()
        self.task_index = {n: i for i, n in enumerate(self.task_names)}
        optimizer = make_optimizer(model, tr.learning_rate, tr.weight_decay)
        preflight.configure_deepspeed(acc, cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        checkpointing.install_hooks(acc)
        set_seed(cfg.seed, device_specific=True)  # dropout differs between processes
        self.balancer = losses.make_balancer(
            tr.loss_balancing,
            self.task_names,
            [t.loss_weight for t in cfg.tasks],
            tr.gradnorm_alpha,
        )
        self.runner = StepRunner(
            acc,
            self.model,
            self.optimizer,
            self.balancer,
            self.task_names,
            self.family,
            tr.max_grad_norm,
        )
        self.window = MetricWindow(self.task_names)
        copies = copy_templates(run_dir, templates) if self.main else {}
        if self.main:
            write_config(run_dir, cfg)
        self.telemetry = Telemetry(
            run_dir,
            enabled=self.main,
            report_to=tr.report_to,
            run_name=cfg.run_name,
            config=config_to_dict(cfg),
        )
        for note in self.telemetry.notes:
            self.telemetry.write(f"note: {note}")
        trainable, total = loading.trainable_parameters(acc.unwrap_model(self.model))
        self.telemetry.write(
            f"model {cfg.model.name} ({self.family}, {cfg.adapter.method}): {trainable:,} of {total:,} parameters "
            f"train; prompt format {self.fmt.kind}; packing {'on' if self.packing else 'off'}; "
            f"{acc.num_processes} process(es) on {acc.device}"
        )
        pad = self.tok.pad_token_id
        self.collate = (
            features.Seq2SeqCollator(pad)
            if self.family == "seq2seq"
            else features.CausalCollator(pad, packing=self.packing, max_length=cfg.model.max_length)
        )
        self.manifest_extra = {
            "run_name": cfg.run_name,
            "tasks": task_manifest(cfg, templates, copies),
            "templates_dir": "templates",
            "max_length": cfg.model.max_length,
            "max_target_length": cfg.model.max_target_length,
        }
        label_tasks = [n for n, m in members.items() if m.info.get("label_task")]
        self.buf = replay.buffer_for_run(cfg, label_tasks) if cfg.replay.enabled else None
        self.global_step = 0
        self.session = {"steps": 0, "loop_seconds": 0.0, "input_tokens": 0.0, "target_tokens": 0.0}

    # ------------------------------------------------------------------ run

    def encode(self, rec) -> dict:
        """Features of one record (completion-only labels, the record's task index)."""
        from t2t_mtl.model import features

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
        from t2t_mtl.training import checkpointing
        from t2t_mtl.training.telemetry import plot_loss_curves

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
        sums = (
            self.acc.gather(_weight_checksum(self.acc.unwrap_model(self.model)).to(self.acc.device))
            .cpu()
            .tolist()
        )
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
        from t2t_mtl.training.batching import Batcher
        from t2t_mtl.training.optimizer_step import load_scheduler_state, make_scheduler

        cfg, tr, st = self.cfg, self.tr, self.cfg.stage_list()[si]
        rep = (
            mixture.replay_member(self.buf)
            if self.buf is not None and si > 0 and self.buf.records()
            else None
        )
        plan = mixture.plan_stage(cfg, si, self.members, replay=rep)
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
        first = 0
        if resume is not None:
            batcher.load_state(resume["batcher"])
            load_scheduler_state(sched, resume["scheduler"])
            first = int(resume["stage_step"])
        self.telemetry.progress(
            st.steps, first, f"stage {st.name}" if len(cfg.stage_list()) > 1 else "train"
        )
        self.window.started = time.time()
        for s in range(first, st.steps):
            self._step(si, s, batcher, sched)
        self.telemetry.close_bar()
        self._save_bundle(self.run_dir / "stages" / st.name / "adapter", st.name)
        if self.buf is not None and si < len(cfg.stage_list()) - 1:
            kept = offer_stage_records(
                self.buf, plan, st.steps * tr.batch_size * tr.grad_accum * self.acc.num_processes
            )
            if self.main:
                self.buf.save(self.run_dir)
            self.telemetry.write(
                f"replay: kept {kept} new record(s) from stage {st.name}; buffer {self.buf.counts()}"
            )

    def _step(self, si: int, s: int, batcher: Any, sched: Any) -> None:
        import torch

        from t2t_mtl.training import checkpointing
        from t2t_mtl.training.optimizer_step import scheduler_state

        tr, st = self.tr, self.cfg.stage_list()[si]
        t = time.time()
        window = batcher.next_window()
        try:
            res = self.runner.run(window)
        except torch.OutOfMemoryError:
            raise T2TError(
                _problem(
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
                    "batcher": batcher.state(),
                    "scheduler": scheduler_state(sched),
                    "balancer": self.balancer.state_dict(),
                    "window": self.window.state_dict(),
                    "replay": self.buf.state() if self.buf is not None else None,
                },
                tr.save_total_limit,
            )
        if self.on_step is not None:
            self.on_step(
                step,
                {
                    "stage": st.name,
                    "stage_step": s + 1,
                    "records": window.keys,
                    "objective": res.objective,
                },
            )

    def _eval(self, stage: str) -> None:
        from t2t_mtl.training.optimizer_step import restore_4bit_for_training

        ctx = EvalContext(
            self.acc,
            self.acc.unwrap_model(self.model),
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
                tmp = self.run_dir / "best" / "best.json.tmp"
                tmp.write_text(json.dumps(info, indent=1))
                os.replace(tmp, self.run_dir / "best" / "best.json")
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
        from t2t_mtl.model import loading

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
            loading.save_adapter_bundle(self.acc.unwrap_model(self.model), self.tok, folder, man)
        self.acc.wait_for_everyone()


# ------------------------------------------------------------------ helpers


def _problem(msg: str, hint: str = "", file: str = "<train>") -> Problem:
    return Problem(file, None, msg, hint)


def offer_stage_records(buf: Any, plan: Any, n: int) -> int:
    """Offer the first `n` records of a stage's stream (what it trained on) to the replay buffer.

    Draws that the buffer ignores anyway (replayed records, upsampled repeats with mix_epoch > 0)
    are skipped without rendering; the others are rendered exactly as the stream renders them.
    """
    stream = plan.stream()
    kept = 0
    for _ in range(n):
        i, row, epoch = stream.next_index()
        m = stream.members[i]
        source = m.info.get("source", "task")
        if source == "replay" or epoch > 0:
            continue
        rec = m.get(row, epoch)
        kept += buf.add(
            dataclasses.replace(rec, meta={**rec.meta, "source": source, "mix_epoch": epoch})
        )
    return kept


def _nonfinite(res: Any, step: int, stage: str, window: Any, run_dir: Path) -> T2TError:
    from t2t_mtl.training import checkpointing

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
        _problem(
            f"step {step} (stage '{stage}'): non-finite {what} for task(s) {', '.join(res.bad_tasks)}; "
            f"tasks in the batch: {', '.join(in_batch)}",
            hint
            + "; lower train.learning_rate, keep train.max_grad_norm > 0, or train in float32/bfloat16 "
            "rather than float16",
        )
    )


def _weight_checksum(model: Any):
    """Σ|w| and Σw over trainable parameters (float64): equal on every process when they agree."""
    import torch

    ps = [p.detach().double() for p in model.parameters() if p.requires_grad]
    return torch.tensor(
        [sum(float(p.abs().sum()) for p in ps), sum(float(p.sum()) for p in ps)],
        dtype=torch.float64,
    )[None]


def _write_summary(
    run_dir: Path, steps: int, seconds: float, checksums: list, processes: int, session: dict
) -> None:
    """`train_summary.json`: steps, wall time, this session's throughput, per-process weight checksums."""
    from t2t_mtl.training.telemetry import read_metrics

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
    (Path(run_dir) / "train_summary.json").write_text(
        json.dumps(summary, indent=1) + "\n", encoding="utf-8"
    )
