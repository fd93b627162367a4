"""The quality study: compared systems x seeds on the five real slices, with 95 % confidence intervals.

    .venv/bin/python bench/bench_quality.py [DATA_DIR] [--split dev|validation] [--systems a,b,...]
        [--seeds 1,2,3] [--rows 300] [--steps 200] [--batch-size 8] [--work runs/bench_quality]
        [--out bench/results/quality_{split}.json] [--doc docs/benchmarks.md] [--no-doc] [--list]

DATA_DIR (default ../shared/data/real) holds the slices SST-2, SICK, SQuAD, CoNLL-2003 and SciTLDR. Every
trained system starts from launch/configs/default.yaml's recipe (embedded SmolLM2-135M-Instruct, LoRA r16/a32
on all linear layers, max_length 256, lr 3e-4 cosine) with the same budget, --steps x --batch-size training
examples (200 x 8 = 1,600), unless the system says otherwise (`--list` prints them all). The seed sets the
mixture order, the LoRA initialisation and dropout (TRL: its data order and init).

Two evaluation splits, so that defaults are never chosen on the rows they are reported on:
- `dev`: --rows rows carved (seeded) out of each slice's *training* file; the systems train on the rest.
  Factor ablations run here.
- `validation`: --rows rows drawn (seeded) from each slice's validation file; systems train on the whole
  training file. The reported comparison runs here.
The same rows are scored for every system and seed, so differences are paired.

Zero-shot transfer (systems `transfer_*`): RTE and AG News, in no training run, scored for the untuned model
and for multi's trained runs (same seeds) in three ways: through the task's template (first training
variant), through a free instruction written for this benchmark (not a template variant, as
`t2t-mtl prompt --instruction` sends it), and by ranked choices (`--mode rank`: the choice with the highest
likelihood, so no answer can be unreadable). --rows rows per task drawn (seeded) from RTE's validation file
(all 277) and AG News's test file (the slice has no validation split); both are disjoint from training.
Their statistics are computed apart from the five trained tasks' (`stats.transfer`).

Every run is a run folder under WORK/<split>/<system>/s<seed> (our trainer, `resume: auto`) or a TRL output
folder. Every evaluation is kept in the repository, bench/results/quality/<split>-<rows>/<system>-s<seed>.json
(each row's generated text and per-row statistics, a few hundred KB), so an interrupted invocation continues
where it stopped, a machine that lost WORK only trains what has no evaluation yet, and a finished study only
recomputes the statistics. The
statistics (bench/quality_stats.py): per task and for the mean over tasks, the mean over seeds with a 95 %
bootstrap interval over examples and seeds, and paired differences with their intervals.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

TASKS = tuple(t for t, _ in common.SLICES)
TRANSFER_TASKS = tuple(t for t, _, _ in common.HELDOUT_SLICES)
SPLITS = ("dev", "validation")
TRANSFER_MODES = ("template", "free", "rank")
# Free instructions for the transfer tasks: plain requests a user could type, not template variants.
FREE_INSTRUCTIONS = {
    "nli_2way": (
        "Read the two texts. Does the first text imply that the second one is true? "
        "Reply with entailment or not_entailment."
    ),
    "topic_ag_news": (
        "What is this news article about? Reply with one word: World, Sports, Business or Sci/Tech."
    ),
}


@dataclasses.dataclass(frozen=True)
class System:
    """One compared system. `kind`: ours (t2t-mtl trainer), trl_hand (TRL SFTTrainer on hand-written plain
    prompts), trl_ours (TRL SFTTrainer on our rendered records: same prompts, chat format and token ids),
    base (the untuned model through our templates)."""

    name: str
    kind: str
    about: str
    tasks: tuple[str, ...] = TASKS
    steps_factor: int = (
        1  # the budget times this (equal exposure: one model sees what 5 specialists see)
    )
    overrides: tuple[tuple[str, Any], ...] = ()  # dotted run-config keys, as on the command line
    one_variant: bool = False  # each template reduced to the variant every system is evaluated on
    once_each: bool = False  # each task capped at its share of the budget: every example seen once
    eval_of: str | None = None  # evaluates that system's trained runs (an evaluation setting only)
    constrained: bool = (
        False  # eval_mode constrained for every task that has a form (label/span/NER)
    )
    # Zero-shot transfer: scored on TRANSFER_TASKS (never trained) through "template", "free" or "rank".
    transfer: str | None = None


SYSTEMS: tuple[System, ...] = (
    System("base", "base", "the untuned model, zero-shot, through our templates"),
    System("multi", "ours", "t2t-mtl, the default multi-task recipe"),
    System("trl_hand", "trl_hand", "TRL SFTTrainer, one hand-written plain prompt per task"),
    System(
        "trl_ours",
        "trl_ours",
        "TRL SFTTrainer on our records (same prompts, chat format, token ids, order)",
    ),
    *(
        System(f"single_{t}", "ours", f"t2t-mtl, {t} alone with the whole budget", tasks=(t,))
        for t in TASKS
    ),
    System(
        "multi_equal",
        "ours",
        "t2t-mtl multi-task with each task's single-task exposure (5x the budget)",
        steps_factor=len(TASKS),
    ),
    # One factor at a time, from our default towards the TRL recipe (ablations; run them on `dev`).
    System("no_packing", "ours", "multi, padded batches", overrides=(("train.packing", "off"),)),
    System("once_each", "ours", "multi, a fixed list: every example seen once", once_each=True),
    System("one_variant", "ours", "multi, one prompt variant per task", one_variant=True),
    System(
        "plain_prompt",
        "ours",
        "multi, plain prompts (no chat template)",
        overrides=(("model.prompt_format", "plain"),),
    ),
    System(
        "trunc_end",
        "ours",
        "multi, inputs cut at the end",
        overrides=(("model.truncation", "end"),),
    ),
    System("no_dropout", "ours", "multi, LoRA dropout 0", overrides=(("adapter.dropout", 0.0),)),
    System(
        "equal_loss",
        "ours",
        "multi, each task's token-mean loss weighted equally",
        overrides=(("train.loss_balancing", "equal"),),
    ),
    System(
        "fp32",
        "ours",
        "multi in float32 (multi trains in bf16 where auto picks it: GPUs, CPUs with AMX-BF16)",
        overrides=(("train.mixed_precision", "no"),),
    ),
    # Against interference in joint training (issue 16's joint table: none = multi).
    System(
        "uncertainty",
        "ours",
        "multi, uncertainty loss weighting (Kendall et al.)",
        overrides=(("train.loss_balancing", "uncertainty"),),
    ),
    System(
        "gradnorm",
        "ours",
        "multi, GradNorm loss weighting",
        overrides=(("train.loss_balancing", "gradnorm"),),
    ),
    System(
        "pcgrad",
        "ours",
        "multi, PCGrad gradient surgery",
        overrides=(("train.gradient_surgery", "pcgrad"),),
    ),
    # Evaluation settings of trained runs (no training of their own).
    System(
        "multi_constrained",
        "ours",
        "multi's runs, constrained decoding (eval_mode: constrained)",
        eval_of="multi",
        constrained=True,
    ),
    System(
        "fp32_constrained",
        "ours",
        "fp32's runs, constrained decoding (eval_mode: constrained)",
        eval_of="fp32",
        constrained=True,
    ),
    # Zero-shot transfer to tasks no run trains on (evaluation settings only; see the module docstring).
    *(
        System(
            f"transfer_{who}" + ("" if mode == "template" else f"_{mode}"),
            kind,
            f"{about}, RTE and AG News (never trained), "
            + {
                "template": "through their templates",
                "free": "through a free instruction",
                "rank": "by ranked choices",
            }[mode],
            tasks=TRANSFER_TASKS,
            eval_of=eval_of,
            transfer=mode,
        )
        for who, kind, about, eval_of in (
            ("base", "base", "the untuned model", None),
            ("multi", "ours", "multi's runs", "multi"),
        )
        for mode in TRANSFER_MODES
    ),
)
BY_NAME = {s.name: s for s in SYSTEMS}
DEFAULT_SYSTEMS = {
    "validation": ("base", "multi", "trl_hand", "trl_ours")
    + tuple(f"single_{t}" for t in TASKS)
    + ("multi_equal",)
    + tuple(
        f"transfer_{who}" + ("" if m == "template" else f"_{m}")
        for who in ("base", "multi")
        for m in TRANSFER_MODES
    ),
    "dev": ("multi", "trl_ours", "no_packing", "once_each", "no_dropout", "fp32"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------- data


def split_data(data: Path, work: Path, split: str, rows: int) -> tuple[dict, dict]:
    """(training folders, evaluation folders) per task for `split`.

    dev: WORK/data/dev/<slice>/{train,validation}.jsonl = the training file without / with `rows` seeded rows.
    validation: training on the real slice; WORK/data/validation/<slice>/validation.jsonl = `rows` seeded
    validation rows. The draw is seeded by the slice name only, so every system and seed sees the same rows.
    Written once; the copies live in the (git-ignored) work folder, never in the repository.
    """
    train, evals = {}, {}
    for tpl, folder in common.SLICES:
        out = work / "data" / split / folder
        src = data / folder
        if split == "dev":
            lines = (src / "train.jsonl").read_text(encoding="utf-8").splitlines()
            pick = set(_draw(len(lines), rows, f"dev:{folder}"))
            if not (out / "validation.jsonl").is_file():
                _write_lines(out / "train.jsonl", [x for i, x in enumerate(lines) if i not in pick])
                _write_lines(out / "validation.jsonl", [lines[i] for i in sorted(pick)])
            train[tpl], evals[tpl] = out, out
        else:
            lines = (src / "validation.jsonl").read_text(encoding="utf-8").splitlines()
            if not (out / "validation.jsonl").is_file():
                pick = _draw(len(lines), rows, f"validation:{folder}")
                _write_lines(out / "validation.jsonl", [lines[i] for i in sorted(pick)])
            train[tpl], evals[tpl] = src, out
    return train, evals


def transfer_data(data: Path, work: Path, rows: int) -> dict:
    """Evaluation folders of the transfer tasks: WORK/data/transfer/<slice>/validation.jsonl = `rows`
    seeded rows of the slice's validation file (AG News: its test file, the slice has no validation
    split). The same rows for either --split: no run trains on these slices."""
    out = {}
    for tpl, folder, splits in common.HELDOUT_SLICES:
        dst = work / "data" / "transfer" / folder
        if not (dst / "validation.jsonl").is_file():
            name = splits.get("validation", "validation")
            lines = (data / folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
            pick = _draw(len(lines), rows, f"transfer:{folder}")
            _write_lines(dst / "validation.jsonl", [lines[i] for i in sorted(pick)])
        out[tpl] = dst
    return out


def _draw(n: int, k: int, key: str) -> list[int]:
    """`k` of `n` row indices, seeded by `key` (stable across machines and Python versions)."""
    return random.Random(key).sample(range(n), min(k, n))


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    tmp.replace(path)


def task_entries(folders: dict, names: tuple[str, ...], cap: int | None = None) -> list[dict]:
    out = []
    for t in names:
        e: dict[str, Any] = {"template": t, "source": {"path": str(folders[t])}}
        if cap:
            e["max_examples"] = cap
        out.append(e)
    return out


# ------------------------------------------------------------------------- configs


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def run_config(args, system: System, seed: int, train_dirs: dict, run_dir: Path):
    """The default recipe with the system's tasks, budget, seed and overrides; its run folder `run_dir`."""
    from t2t_mtl.core.config import load_config

    steps = args.steps * system.steps_factor
    cap = (steps * args.batch_size) // len(system.tasks) if system.once_each else None
    tasks = task_entries(train_dirs, system.tasks, cap)
    if system.one_variant:
        tasks = one_variant_tasks(run_dir.parent.parent / "one_variant_templates", tasks)
    d = common.default_recipe()
    d.update(run_name=f"{system.name}-s{seed}", output_dir=str(run_dir), seed=seed, tasks=tasks)
    d["train"].update(
        steps=steps,
        batch_size=args.batch_size,
        save_steps=50,
        save_total_limit=1,
        resume="auto",
        bad_rows="skip",
        report_to="none",
    )
    d["eval"].update(every_steps=0, limit=args.rows, split="validation")
    for key, value in system.overrides:
        _set(d, key, value)
    return load_config(data=d)


def one_variant_tasks(out_dir: Path, tasks: list[dict]) -> list[dict]:
    """`tasks` with each template copied to `out_dir` keeping only its first training variant (same name,
    same variant id, so evaluation renders exactly what it renders for the other systems)."""
    import yaml

    from t2t_mtl.tasks.catalogue import load_task

    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for t in tasks:
        tpl = load_task(t["template"])
        d = copy.deepcopy(tpl.data)  # the merged data: includes resolved
        d.pop("include", None)
        d["variants"] = [v for v in d["variants"] if not v.get("heldout")][:1]
        d.pop("samples", None)  # the slices replace the bundled samples (the path was relative)
        dst = out_dir / tpl.path.name
        dst.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True), encoding="utf-8")
        out.append({**t, "template": str(dst)})
    return out


def eval_config(args, eval_dirs: dict, transfer_dirs: dict | None = None):
    """A config naming the five tasks (and the transfer tasks when `transfer_dirs` is given) on the
    evaluation rows (for our evaluator's task list)."""
    from t2t_mtl.core.config import load_config

    tasks = task_entries(eval_dirs, TASKS)
    if transfer_dirs:
        tasks += task_entries(transfer_dirs, TRANSFER_TASKS)
    d = common.default_recipe()
    d.update(tasks=tasks, output_dir=str(Path(args.work) / "_eval"))
    return load_config(data=d)


# ------------------------------------------------------------------------- training


def train_ours(cfg) -> float:
    """Train the run unless it already finished (an unfinished one resumes); its training seconds."""
    from t2t_mtl.training import trainer

    run_dir = Path(cfg.output_dir)
    if not (run_dir / "train_summary.json").is_file():
        log(f"training {cfg.run_name} ({cfg.train.steps} steps x {cfg.train.batch_size})")
        trainer.train(cfg, eval_fn=None)
    s = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
    return float(s.get("seconds") or 0.0)


def hand_prompt(task: str, row: dict, tok, budget: int = 180) -> str:
    """Hand-written plain-text prompts, one per task (the TRL baseline: no templates, no chat format)."""

    def fit(text: str) -> str:  # cut to `budget` tokens, as a careful user does so answers survive
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= budget else tok.decode(ids[:budget])

    if task == "sentiment_sst2":
        return f"Review: {row['text']}\nSentiment (negative or positive):"
    if task == "nli_3way":
        return (
            f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\n"
            "Relation (entailment, neutral or contradiction):"
        )
    if task == "qa_squad":
        return f"Context: {fit(row['context'])}\nQuestion: {row['question']}\nAnswer:"
    if task == "ner_conll2003":
        return f"Sentence: {' '.join(row['tokens'])}\nNamed entities (TYPE: name | ..., or none):"
    if task == "summarization":
        return f"Abstract: {fit(row['document'])}\nOne-sentence summary:"
    raise KeyError(task)


def trl_data(cfg, tok, fmt, hand: bool) -> list[dict]:
    """The TRL baselines' prompt/completion rows.

    hand: the same budget split equally over the tasks, distinct rows drawn with the seed, hand prompts and
    our verbalised answers. ours: the first steps x batch records of our own stage-0 stream, encoded by our
    features code and decoded back to text (prompt = up to the first target token), in stream order.
    """
    from t2t_mtl.evaluation import evaluator
    from t2t_mtl.tasks import sources

    n = cfg.train.steps * cfg.train.batch_size
    if hand:
        rng, data = random.Random(cfg.seed), []
        tasks = evaluator.eval_tasks(cfg)
        for t in tasks:
            rows = sources.load_rows(t.template, t.source, "train", bad_rows="skip")
            order = list(range(len(rows)))
            rng.shuffle(order)
            for i in order[: n // len(tasks)]:
                rec = t.template.render(rows[i], t.variant_id(), row_id=str(i), split="train")
                data.append(
                    {"prompt": hand_prompt(t.name, rows[i], tok), "completion": " " + rec.output}
                )
        rng.shuffle(data)
        return data
    return [
        {"prompt": e["prompt"], "completion": e["completion"]}
        for e in common.stream_examples(cfg, tok, fmt, n)
    ]


_ELAPSED = "t2t_elapsed.json"  # training seconds up to a TRL checkpoint, kept inside it


def _trl_elapsed(checkpoint: Path) -> float:
    """Training seconds spent up to `checkpoint` (0 for a checkpoint written before they were kept)."""
    f = checkpoint / _ELAPSED
    return float(json.loads(f.read_text(encoding="utf-8"))["seconds"]) if f.is_file() else 0.0


def train_trl(cfg, out_dir: Path, hand: bool) -> float:
    """Train a TRL SFTTrainer baseline once (adapter in out_dir/adapter); its training seconds.

    Same model, LoRA settings, batch size, max length, learning rate, warm-up and schedule as `cfg`;
    completion-only loss, no packing (TRL's defaults for a prompt/completion dataset), fp32 like ours
    unless cfg asks for bf16."""
    summary = out_dir / "train_summary.json"
    if summary.is_file():
        return float(json.loads(summary.read_text(encoding="utf-8"))["seconds"])
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    class _ElapsedCallback(TrainerCallback):
        """Writes the training seconds so far into each checkpoint TRL saves."""

        def __init__(self, before: float, t0: float):
            self.before, self.t0 = before, t0

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                seconds = self.before + time.time() - self.t0
                common.write_json(ckpt / _ELAPSED, {"seconds": round(seconds, 1)})

    from t2t_mtl.model import loading
    from t2t_mtl.model.prompt_format import PromptFormat

    model, tok, family = loading.load_model_and_tokenizer(cfg.model, None, for_training=True)
    fmt = PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format, cfg.model.truncation)
    data = trl_data(cfg, tok, fmt, hand)
    targs, lora = common.trl_configs(
        cfg,
        str(out_dir / "trainer"),
        cfg.train.steps,
        logging_steps=10,
        # ours: the stream's order is the point of the comparison; hand: the list is already shuffled
        train_sampling_strategy="sequential",
        save_strategy="steps",
        save_steps=20,
        save_total_limit=1,
    )
    tr = cfg.train
    # Resumable like our runs (a TRL baseline is an hour of CPU): a checkpoint every 20 steps, and the
    # training seconds up to it beside it, so a resumed run counts the redone steps once.
    last = get_last_checkpoint(str(out_dir / "trainer")) if (out_dir / "trainer").is_dir() else None
    before = _trl_elapsed(Path(last)) if last else 0.0
    log(
        f"training {out_dir.parent.name}/{out_dir.name} (TRL, {tr.steps} steps x {tr.batch_size})"
        + (f", resuming from {Path(last).name}" if last else "")
    )
    t0 = time.time()
    trainer = SFTTrainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_list(data),
        processing_class=tok,
        peft_config=lora,
        callbacks=[_ElapsedCallback(before, t0)],
    )
    trainer.train(resume_from_checkpoint=last)
    trainer.model.save_pretrained(str(out_dir / "adapter"))
    seconds = round(before + time.time() - t0, 1)
    common.write_json(
        summary, {"seconds": seconds, "examples": len(data), "log": trainer.state.log_history}
    )
    return seconds


# ------------------------------------------------------------------------- evaluation


EVALS = ROOT / "bench" / "results" / "quality"


def eval_path(split: str, rows: int, system: str, seed: int | str) -> Path:
    """Where a system's evaluation at one seed is kept (in the repository, see the module docstring)."""
    return EVALS / f"{split}-{rows}" / f"{system}-s{seed}.json"


def evaluate_system(args, system: System, cfg, out_dir: Path, ecfg, path: Path) -> dict:
    """Each evaluated row's generated text and statistics, per task (cached in `path`)."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from t2t_mtl.evaluation import evaluator
    from t2t_mtl.model import loading
    from t2t_mtl.model.prompt_format import PromptFormat

    log(f"evaluating {out_dir.parent.name}/{out_dir.name}")
    t0 = time.time()
    if system.kind == "ours":
        from t2t_mtl.runs.folder import Run

        # Merged into the float32 base as `t2t-mtl eval` does (eval.merge_adapter): the same answers
        # (bench_eval: every prediction identical), 1.17x faster.
        model, tok, _family, manifest = loading.load_for_inference(
            Run.load(out_dir).bundle_dir(), merge=True
        )
        fmt = PromptFormat.from_dict(manifest["prompt_format"])
    else:
        model, tok, family = loading.load_model_and_tokenizer(cfg.model, None)
        fmt = PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format, cfg.model.truncation)
        if system.kind.startswith("trl"):
            from peft import PeftModel

            model = loading.merge_lora_for_inference(
                PeftModel.from_pretrained(model, str(out_dir / "adapter"))
            )
    model.eval()
    tasks = [t for t in evaluator.eval_tasks(ecfg) if t.name in system.tasks]
    out: dict[str, Any] = {"split": args.split, "rows": args.rows, "tasks": {}}
    for t in tasks:
        examples, rows = evaluator.load_examples(t, "validation", None)
        ranked = None  # ranked choices (transfer "rank"): scored as picked, kept as their text
        if system.transfer:
            answers = transfer_answers(system.transfer, model, tok, fmt, t, examples, cfg)
            if system.transfer == "rank":
                ranked, texts = answers, [r.choice for r in answers]
            else:
                texts = answers
        elif system.kind == "trl_hand":
            prompts = [
                hand_prompt(t.name, rows[int(ex.record.meta["row_id"])], tok) for ex in examples
            ]
            texts = greedy(model, tok, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        else:
            from t2t_mtl.model.generation import generate_texts

            rules = None
            if system.constrained and t.template.parse != "text":
                rules = evaluator.answer_constraints(t.template, examples)
            texts = generate_texts(
                model,
                tok,
                fmt,
                [ex.record for ex in examples],
                max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                max_prompt_tokens=cfg.model.max_length,
                constraints=rules,
            )
        summary, _ = evaluator.score_task(t.template, examples, texts, ranked=ranked)
        out["tasks"][t.name] = {
            "row_ids": [ex.record.meta.get("row_id") for ex in examples],
            "texts": list(texts),
            "primary": summary.get("primary"),
            "invalid_rate": summary.get("invalid_rate"),
            "per_example": summary.get("per_example"),
        }
    out["seconds"] = round(time.time() - t0, 1)
    common.write_json(path, out)
    return out


def transfer_answers(mode: str, model, tok, fmt, task, examples, cfg) -> list:
    """A transfer task's answers: `rank` -> the ranked choices (`Ranked`), else generated texts for the
    template's prompt (`template`) or the same input under FREE_INSTRUCTIONS (`free`).

    Generation as `t2t-mtl eval` does it for label tasks: each answer ends at its first line (labels are
    parsed from it), within eval.max_new_tokens (the transfer folders have no training file to fit a
    budget on); the same for the untuned and the tuned model, so both are read alike."""
    from t2t_mtl.model.generation import generate_texts, rank_choices

    recs = [ex.record for ex in examples]
    if mode == "rank":
        return rank_choices(
            model,
            tok,
            fmt,
            recs,
            task.template.answer_choices,
            batch_size=cfg.eval.batch_size,
            max_prompt_tokens=cfg.model.max_length,
        )
    if mode == "free":
        recs = [dataclasses.replace(r, instruction=FREE_INSTRUCTIONS[task.name]) for r in recs]
    return generate_texts(
        model,
        tok,
        fmt,
        recs,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        max_prompt_tokens=cfg.model.max_length,
        stop_after_line=True,
    )


def greedy(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Plain greedy decoding of text prompts (left padding), up to EOS; the answer text only."""
    import torch

    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )
        for row in gen[:, enc["input_ids"].shape[1] :]:
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


# ------------------------------------------------------------------------- driver


def run_one(args, system: System, seed: int, dirs: tuple[dict, dict], ecfg) -> dict:
    """Train (once) and evaluate (once) one system at one seed; its cached evaluation and times."""
    train_dirs, _ = dirs
    # an evaluation setting scores another system's runs; every setting of the untuned model, base's
    trained = BY_NAME[system.eval_of or ("base" if system.kind == "base" else system.name)]
    out_dir = (
        Path(args.work)
        / args.split
        / trained.name
        / (f"s{seed}" if system.kind != "base" else "s0")
    )
    cfg = run_config(args, trained, seed, train_dirs, out_dir)
    path = eval_path(args.split, args.rows, system.name, out_dir.name[1:])
    if path.is_file():  # evaluated before (perhaps on another machine): nothing to train
        res = json.loads(path.read_text(encoding="utf-8"))
        return {
            "train_seconds": res.get("train_seconds", 0.0),
            "eval_seconds": res.get("seconds"),
            "eval": str(path.relative_to(ROOT)),
            **({"eval_of": system.eval_of} if system.eval_of else {}),
            **({"transfer": system.transfer} if system.transfer else {}),
        }
    seconds = 0.0
    if system.kind == "ours":
        seconds = train_ours(cfg)
    elif system.kind.startswith("trl"):
        seconds = train_trl(cfg, out_dir, hand=system.kind == "trl_hand")
    res = evaluate_system(args, system, cfg, out_dir, ecfg, path)
    if res.get("train_seconds") != seconds:
        res["train_seconds"] = seconds
        common.write_json(path, res)
    return {
        "train_seconds": seconds,
        "eval_seconds": res.get("seconds"),
        "eval": str(path.relative_to(ROOT)),
        **({"eval_of": system.eval_of} if system.eval_of else {}),
        **({"transfer": system.transfer} if system.transfer else {}),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(common.DEFAULT_DATA))
    ap.add_argument("--split", choices=SPLITS, default="validation")
    ap.add_argument("--systems", default=None, help="comma-separated (default: the split's set)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--rows", type=int, default=300, help="evaluated rows per task")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_quality"))
    ap.add_argument("--out", default=None, help="default bench/results/quality_<split>.json")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the systems and exit")
    args = ap.parse_args(argv)
    if args.list:
        for s in SYSTEMS:
            print(f"{s.name:20} {s.kind:9} {s.about}")
        return 0
    names = [x.strip() for x in (args.systems or ",".join(DEFAULT_SYSTEMS[args.split])).split(",")]
    data = Path(args.data_dir).resolve()
    errors = [f"error: unknown system '{n}' (see --list)" for n in names if n not in BY_NAME]
    transfer = any(BY_NAME[n].transfer for n in names if n in BY_NAME)
    errors += common.check_data_dir(
        data,
        [f for _, f in common.SLICES]
        + ([f for _, f, _ in common.HELDOUT_SLICES] if transfer else []),
    )
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        errors.append(f"error: --seeds must be comma-separated integers, got '{args.seeds}'")
    if errors:
        return common.report_errors(errors)
    out_path = Path(args.out or ROOT / "bench" / "results" / f"quality_{args.split}.json")
    results = json.loads(out_path.read_text(encoding="utf-8")) if out_path.is_file() else {}
    results["settings"] = {
        "split": args.split,
        "rows": args.rows,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "examples": args.steps * args.batch_size,
        "data": str(data),
        "seeds": seeds,
    }
    runs = results.setdefault("runs", {})
    dirs = split_data(data, Path(args.work), args.split, args.rows)
    ecfg = eval_config(
        args, dirs[1], transfer_data(data, Path(args.work), args.rows) if transfer else None
    )
    t_start = time.time()
    # Seed-major order: after the first pass every system has one seed, so a partial study is usable.
    for seed in seeds:
        for name in names:
            system = BY_NAME[name]
            if system.kind == "base" and seed != seeds[0]:
                continue  # greedy decoding of the untuned model does not depend on the seed
            info = run_one(args, system, seed, dirs, ecfg)
            runs.setdefault(name, {})[str(seed if system.kind != "base" else 0)] = info
            results["machine"] = common.machine(
                command="python bench/bench_quality.py " + " ".join(argv or sys.argv[1:])
            )
            common.write_json(out_path, results)
    log(f"all runs present ({time.time() - t_start:.0f} s this invocation)")
    import quality_stats

    results["stats"] = quality_stats.study_stats(results)
    common.write_json(out_path, results)
    if not args.no_doc:
        import report_quality

        report_quality.write(results, Path(args.doc))
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
