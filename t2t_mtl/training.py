"""`train(cfg)`: tasks -> mixture (+ replay) -> features -> model -> accelerate loop -> run folder.

`accelerate launch launch/train.py --config CFG [k=v ...]` and `t2t-mtl train --config CFG [k=v ...]`
both call `train`. Order of work:
1. `validate` everything that can be checked cheaply — config cross-checks, templates, sources (rows
   are read and checked), model name, device options — and raise one T2TError listing every problem;
2. load the model (LoRA / QLoRA / full, `modeling`), pick the prompt format and packing, build the
   optimiser, `accelerator.prepare` (DDP / FSDP / DeepSpeed come from the accelerate config);
3. resume from the last complete checkpoint (`train.resume: auto`), including the stream position;
4. per stage: plan the mixture (with the replay member after the first stage), feed windows
   (`batching`) to `train_step.StepRunner`, log (`telemetry`), checkpoint (`checkpointing`), call the
   evaluation hook every `eval.every_steps`; at the stage end save `stages/<name>/adapter`, offer the
   stage's records to the replay buffer and save it;
5. save the final bundle `adapter/` (with `t2t_manifest.json`) and `loss_curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import mixing, replay, run_folder, tasks
from .config import EMBEDDED_MODEL, RunConfig, config_to_dict
from .errors import Problem, T2TError

RESOURCE_HINT = ("lower train.batch_size (raise train.grad_accum to keep the effective batch), lower "
                 "model.max_length, set train.gradient_checkpointing=true, or use adapter.method=qlora")


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


EvalFn = Callable[[EvalContext], Optional[dict]]
StepHook = Callable[[int, dict], None]


def _problem(msg: str, hint: str = "", file: str = "<config>") -> Problem:
    return Problem(file, None, msg, hint)


def validate(cfg: RunConfig) -> tuple[dict, dict]:
    """Check templates, sources, model name and device options together; returns (members, templates).

    Raises one T2TError with every problem found.
    """
    from . import modeling

    problems = list(tasks.check_config(cfg))
    members: dict = {}
    if not problems:
        try:
            members = mixing.build_members(cfg)
        except T2TError as e:
            problems += e.problems
    empty = [n for n, m in members.items() if m.size == 0]
    problems += [_problem(f"task '{n}' has no training rows", "check its source and the bad-row report") for n in empty]
    try:
        modeling.check_device_options(cfg.model, cfg.adapter)
    except T2TError as e:
        problems += e.problems
    name = cfg.model.name
    try:
        if name == EMBEDDED_MODEL:
            modeling.embedded_gguf()
        else:
            local = cfg.resolve_path(name)
            _, _, hf_cfg = modeling.resolve_model(str(local) if local.exists() else name, cfg.model.trust_remote_code)
            modeling.detect_family(hf_cfg, cfg.model.family, name)
            limit = getattr(hf_cfg, "max_position_embeddings", None) or getattr(hf_cfg, "n_positions", None)
            if limit and not getattr(hf_cfg, "is_encoder_decoder", False) and cfg.model.max_length > limit:
                problems.append(_problem(f"model.max_length: {cfg.model.max_length} is more than the model's "
                                         f"{limit} positions", f"use model.max_length <= {limit}"))
    except T2TError as e:
        problems += e.problems
    problems += _backend_problems(cfg)
    if cfg.replay.enabled and len(cfg.stage_list()) < 2:
        print("note: replay.enabled has no effect with a single stage", file=sys.stderr)
    if problems:
        raise T2TError(problems)
    extra = [cfg.resolve_path(d) for d in cfg.template_dirs]
    templates = {n: tasks.load_task(t.template, extra) for n, t in zip(cfg.task_names(), cfg.tasks)}
    return members, templates


def _backend_problems(cfg: RunConfig) -> list[Problem]:
    """Settings the launch environment (accelerate config, GPU generation) cannot run."""
    import os

    import torch

    out = []
    sharded = _sharded_backend()
    if cfg.train.loss_balancing == "gradnorm" and sharded:
        out.append(_problem("train.loss_balancing: gradnorm needs whole parameters on every process",
                            "use it with one GPU, DDP or DeepSpeed ZeRO-1/2, not FSDP or ZeRO-3"))
    if cfg.adapter.method == "qlora" and sharded:
        out.append(_problem("adapter.method: qlora is not supported with FSDP or DeepSpeed ZeRO-3 here",
                            "use launch/accelerate/ddp.yaml or deepspeed_zero2.yaml, or method: lora"))
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    cuda = torch.cuda.is_available()
    if mixed == "fp16" and not cuda:
        out.append(_problem("accelerate mixed_precision fp16 needs a GPU", "use --mixed_precision bf16 or no on CPU"))
    wants_bf16 = cfg.model.dtype == "bfloat16" or mixed == "bf16" or (
        cfg.adapter.method == "qlora" and cfg.adapter.compute_dtype == "bfloat16")
    if cuda and wants_bf16 and not torch.cuda.is_bf16_supported():
        out.append(_problem("bfloat16 is not supported by this GPU (needs compute capability 8.0+)",
                            "set model.dtype/adapter.compute_dtype to float16 or float32 and mixed_precision fp16"))
    return out


def _cpu_processes() -> bool:
    """True for several processes on a machine without an accelerator (DDP over gloo).

    accelerate's `--cpu` launcher starts one process (without mpirun), so several CPU processes come
    from `accelerate launch --multi_gpu --num_processes N` (or torchrun); accelerate would then
    treat each as a separate single-process run unless told to use the CPU backend.
    """
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    avail = getattr(torch, "accelerator", None)
    has_accel = avail.is_available() if avail is not None and hasattr(avail, "is_available") else torch.cuda.is_available()
    return not has_accel


def _sharded_backend() -> bool:
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"


def _resume_point(cfg: RunConfig, run_dir: Path) -> Optional[Path]:
    from . import checkpointing

    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return checkpointing.latest_checkpoint(run_dir)
    p = cfg.resolve_path(mode)
    if not (p / checkpointing.STATE_FILE).is_file():
        raise T2TError(_problem(f"train.resume: {mode} is not a checkpoint folder",
                                "use auto, never, or a run's checkpoints/step-N folder"))
    return p


def train(cfg: RunConfig, *, eval_fn: Optional[EvalFn] = None, on_step: Optional[StepHook] = None) -> Path:
    """Train per `cfg`; returns the run folder. `eval_fn` is the evaluation hook (called every
    `eval.every_steps` and its scalars logged as eval/...); `on_step(step, info)` runs after every
    optimiser step (tests use it to see the records and to interrupt a run)."""
    t0 = time.time()
    members, templates = validate(cfg)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from . import checkpointing, features, losses, modeling
    from .batching import Batcher
    from .prompt_format import PromptFormat
    from .telemetry import MetricWindow, Telemetry, plot_loss_curves
    from .train_step import StepRunner, make_optimizer, make_scheduler

    tr = cfg.train
    acc = Accelerator(gradient_accumulation_steps=tr.grad_accum, cpu=_cpu_processes())
    main = acc.is_main_process
    run_dir = Path(cfg.output_dir).expanduser()
    ckpt = _resume_point(cfg, run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            run_folder.clear_previous(run_dir)
        else:
            changed = run_folder.config_changes(run_dir, cfg)
            if changed:
                print(f"note: resuming {ckpt} with changed settings: {', '.join(changed)}", file=sys.stderr)
            run_folder.trim_metrics(run_dir, checkpointing.read_state(ckpt)["global_step"])
    acc.wait_for_everyone()

    set_seed(cfg.seed)  # same adapter initialisation on every process
    try:
        model, tok, family = modeling.load_model_and_tokenizer(cfg.model, cfg.adapter, for_training=True,
                                                               gradient_checkpointing=tr.gradient_checkpointing)
    except torch.OutOfMemoryError:
        raise T2TError(_problem("out of memory while loading the model", RESOURCE_HINT)) from None
    fmt = PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format)
    packing = family == "causal" and features.resolve_packing(tr.packing, model)
    restore_4bit_for_training(model)  # the packing probe ran in eval mode
    task_names = cfg.task_names()
    task_index = {n: i for i, n in enumerate(task_names)}
    optimizer = make_optimizer(model, tr.learning_rate, tr.weight_decay)
    _configure_deepspeed(acc, cfg)
    model, optimizer = acc.prepare(model, optimizer)
    checkpointing.install_hooks(acc)
    set_seed(cfg.seed, device_specific=True)  # dropout differs between processes
    balancer = losses.make_balancer(tr.loss_balancing, task_names, [t.loss_weight for t in cfg.tasks],
                                    tr.gradnorm_alpha)
    runner = StepRunner(acc, model, optimizer, balancer, task_names, family, tr.max_grad_norm)
    window_stats = MetricWindow(task_names)
    copies = run_folder.copy_templates(run_dir, templates) if main else {}
    if main:
        run_folder.write_config(run_dir, cfg)
    telemetry = Telemetry(run_dir, enabled=main, report_to=tr.report_to, run_name=cfg.run_name,
                          config=config_to_dict(cfg))
    for note in telemetry.notes:
        telemetry.write(f"note: {note}")
    trainable, total = modeling.trainable_parameters(acc.unwrap_model(model))
    telemetry.write(f"model {cfg.model.name} ({family}, {cfg.adapter.method}): {trainable:,} of {total:,} "
                    f"parameters train; prompt format {fmt.kind}; packing {'on' if packing else 'off'}; "
                    f"{acc.num_processes} process(es) on {acc.device}")

    def encode(rec):
        return features.encode(rec, tok, fmt, cfg.model.max_length, cfg.model.max_target_length,
                               task_index=task_index[rec.task])

    pad = tok.pad_token_id
    collate = features.Seq2SeqCollator(pad) if family == "seq2seq" else \
        features.CausalCollator(pad, packing=packing, max_length=cfg.model.max_length)

    label_tasks = [n for n, m in members.items() if m.info.get("label_task")]
    buf = replay.buffer_for_run(cfg, label_tasks) if cfg.replay.enabled else None
    state: dict = {}
    if ckpt is not None:
        state = checkpointing.load(acc, ckpt)
        balancer.load_state_dict(state["balancer"])
        window_stats.load_state_dict(state["window"])
        if state.get("replay") is not None:
            buf = replay.ReplayBuffer.from_state(state["replay"])
        telemetry.write(f"resuming from {ckpt} (step {state['global_step']})")
    global_step = int(state.get("global_step", 0))
    session = {"steps": 0, "loop_seconds": 0.0, "input_tokens": 0.0, "target_tokens": 0.0}
    stages = cfg.stage_list()
    manifest_extra = {"run_name": cfg.run_name, "tasks": run_folder.task_manifest(cfg, templates, copies),
                      "templates_dir": "templates", "max_length": cfg.model.max_length,
                      "max_target_length": cfg.model.max_target_length}

    def save_bundle(folder: Path, stage: str) -> None:
        if main:
            man = modeling.bundle_manifest(cfg.model, cfg.adapter, family, fmt, step=global_step, stage=stage,
                                           **manifest_extra)
            modeling.save_adapter_bundle(acc.unwrap_model(model), tok, folder, man)
        acc.wait_for_everyone()

    try:
        for si in range(int(state.get("stage_index", 0)), len(stages)):
            st = stages[si]
            rep = mixing.replay_member(buf) if buf is not None and si > 0 and buf.records() else None
            plan = mixing.plan_stage(cfg, si, members, replay=rep)
            if main:
                run_folder.write_mixture(run_dir, run_folder.mixture_entry(plan, cfg))
            batcher = Batcher(plan.stream(), encode=encode, collate=collate, batch_size=tr.batch_size,
                              grad_accum=tr.grad_accum, world_size=acc.num_processes, rank=acc.process_index,
                              group_by_length=family == "seq2seq" and tr.group_by_length, seq2seq=family == "seq2seq",
                              total_steps=st.steps)
            sched = make_scheduler(optimizer, tr.scheduler, tr.warmup_steps, st.steps)
            first = 0
            if state and si == int(state["stage_index"]):
                from .train_step import load_scheduler_state

                batcher.load_state(state["batcher"])
                load_scheduler_state(sched, state["scheduler"])
                first = int(state["stage_step"])
            telemetry.progress(st.steps, first, f"stage {st.name}" if len(stages) > 1 else "train")
            window_stats.started = time.time()
            for s in range(first, st.steps):
                ts = time.time()
                window = batcher.next_window()
                try:
                    res = runner.run(window)
                except torch.OutOfMemoryError:
                    raise T2TError(_problem(f"out of memory at step {global_step + 1} (batch_size {tr.batch_size}, "
                                            f"max_length {cfg.model.max_length})", RESOURCE_HINT)) from None
                if not res.finite:
                    raise _nonfinite(res, global_step + 1, st.name, window, run_dir)
                lr = sched.get_last_lr()[0]
                sched.step()
                global_step += 1
                session["steps"] += 1
                session["loop_seconds"] += time.time() - ts
                session["input_tokens"] += res.input_tokens
                session["target_tokens"] += float(res.tokens.sum())
                window_stats.add(res.objective, res.sums.tolist(), res.tokens.tolist(), window.records,
                                 res.input_tokens)
                telemetry.advance({"loss": f"{res.objective:.4f}"})
                if global_step % tr.logging_steps == 0 or s == st.steps - 1:
                    row = {**window_stats.row(), "lr": lr, "stage_step": s + 1}
                    if res.grad_norm is not None:
                        row["grad_norm"] = res.grad_norm
                    row.update({f"weight/{k}": v for k, v in balancer.weights().items()})
                    telemetry.log(global_step, row, stage=st.name)
                    window_stats.reset()
                if eval_fn is not None and cfg.eval.every_steps and global_step % cfg.eval.every_steps == 0:
                    _run_eval(eval_fn, EvalContext(acc, acc.unwrap_model(model), tok, fmt, family, cfg, run_dir,
                                                   st.name, global_step), model, telemetry)
                if global_step % tr.save_steps == 0 or s == st.steps - 1:
                    checkpointing.save(acc, run_dir, global_step, {
                        "global_step": global_step, "stage_index": si, "stage": st.name, "stage_step": s + 1,
                        "batcher": batcher.state(), "scheduler": _sched_state(sched),
                        "balancer": balancer.state_dict(), "window": window_stats.state_dict(),
                        "replay": buf.state() if buf is not None else None}, tr.save_total_limit)
                if on_step is not None:
                    on_step(global_step, {"stage": st.name, "stage_step": s + 1, "records": window.keys,
                                          "objective": res.objective})
            telemetry.close_bar()
            save_bundle(run_dir / "stages" / st.name / "adapter", st.name)
            if buf is not None and si < len(stages) - 1:
                n = st.steps * tr.batch_size * tr.grad_accum * acc.num_processes
                kept = offer_stage_records(buf, plan, n)
                if main:
                    buf.save(run_dir)
                telemetry.write(f"replay: kept {kept} new record(s) from stage {st.name}; buffer {buf.counts()}")
            state = {}
        save_bundle(run_dir / "adapter", stages[-1].name)
        sums = acc.gather(_weight_checksum(acc.unwrap_model(model)).to(acc.device)).cpu().tolist()
        if main:
            png = plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curves.png")
            _write_summary(run_dir, global_step, time.time() - t0, sums, acc.num_processes, session)
            telemetry.write(f"done in {time.time() - t0:.0f} s: {run_dir / 'adapter'}"
                            + (f"; loss curves {png}" if png else ""))
    finally:
        telemetry.close()
    return run_dir


def _configure_deepspeed(acc: Any, cfg: RunConfig) -> None:
    """DeepSpeed sizes its batches at prepare time from a dataloader we do not use: give it the run's
    micro-batch size and clipping (its `auto` values) instead."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.train.max_grad_norm


def _sched_state(sched) -> dict:
    from .train_step import scheduler_state

    return scheduler_state(sched)


def _run_eval(eval_fn: EvalFn, ctx: EvalContext, model: Any, telemetry: Any) -> None:
    model.eval()
    try:
        result = eval_fn(ctx) or {}
    finally:
        model.train()
        restore_4bit_for_training(model)
    scalars = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    if scalars:
        telemetry.log(ctx.step, scalars, stage=ctx.stage)


def restore_4bit_for_training(model: Any) -> None:
    """Undo bitsandbytes' CPU inference layout of 4-bit weights before training continues.

    On CPUs with AVX512-BF16, the first eval-mode forward of a `Linear4bit` repacks its weight for a
    fast inference kernel that has no backward: gradients would silently stop at every 4-bit layer
    (only LoRA adapters right before the residual stream would train). Converting back is cheap.
    """
    try:
        from bitsandbytes.nn.modules import Linear4bit, _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes (then there are no 4-bit layers either)
        return
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if isinstance(m, Linear4bit) and qs is not None and getattr(qs, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)


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
        kept += buf.add(dataclasses.replace(rec, meta={**rec.meta, "source": source, "mix_epoch": epoch}))
    return kept


def _nonfinite(res: Any, step: int, stage: str, window: Any, run_dir: Path) -> T2TError:
    from . import checkpointing

    last = checkpointing.latest_checkpoint(run_dir)
    in_batch = sorted({t for m in window.tasks for t in m} | {k for k, v in window.records.items() if v})
    what = "gradient norm" if res.grad_norm is not None else "loss"
    hint = (f"training stopped before the optimiser step; the last good checkpoint is {last}" if last else
            "training stopped before the optimiser step; no checkpoint was written yet")
    return T2TError(_problem(
        f"step {step} (stage '{stage}'): non-finite {what} for task(s) {', '.join(res.bad_tasks)}; "
        f"tasks in the batch: {', '.join(in_batch)}",
        hint + "; lower train.learning_rate, keep train.max_grad_norm > 0, or train in float32/bfloat16 "
               "rather than float16", file="<train>"))


def _weight_checksum(model: Any):
    """Σ|w| and Σw over trainable parameters (float64): equal on every process when they agree."""
    import torch

    ps = [p.detach().double() for p in model.parameters() if p.requires_grad]
    return torch.tensor([sum(float(p.abs().sum()) for p in ps), sum(float(p.sum()) for p in ps)],
                        dtype=torch.float64)[None]


def _write_summary(run_dir: Path, steps: int, seconds: float, checksums: list, processes: int,
                   session: dict) -> None:
    """`train_summary.json`: steps, wall time, this session's throughput, per-process weight checksums."""
    from .telemetry import read_metrics

    last = next((r for r in reversed(read_metrics(run_dir / "metrics.jsonl")) if "loss" in r), {})
    loop = max(session["loop_seconds"], 1e-9)
    summary = {"steps": steps, "seconds": round(seconds, 1), "processes": processes,
               "session": {**session, "tokens_per_s": session["input_tokens"] / loop,
                           "target_tokens_per_s": session["target_tokens"] / loop},
               "final_loss": last.get("loss"),
               "final_task_loss": {k[5:]: v for k, v in last.items() if k.startswith("loss/")},
               "weight_checksums": checksums}
    (Path(run_dir) / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
