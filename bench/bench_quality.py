"""Quality of multi-task fine-tuning on the five real slices (issue 6, benchmark 1), plus the
zero-shot transfer benchmark (3) on tasks left out of training.

    .venv/bin/python bench/bench_quality.py [DATA_DIR] [--parts base,multi,transfer,single,temperature,trl,truncation,one_variant,plain_prompt]
        [--steps 200] [--batch-size 8] [--limit 100] [--work runs/bench_quality]
        [--out bench/results/quality.json] [--doc docs/benchmarks.md] [--no-doc]

DATA_DIR (default ../shared/data/real) holds the slices SST-2, SICK, SQuAD, CoNLL-2003, SciTLDR (training)
and RTE, AG News (transfer only). Every run uses launch/configs/default.yaml's recipe (embedded
SmolLM2-135M-Instruct, LoRA r16/α32 on all linear layers, max_length 256, lr 3e-4 cosine) with the same
budget: --steps × --batch-size training examples (200 × 8 = 1,600). Parts:
- base: the untuned model, prompted with our templates (zero-shot);
- multi: one multi-task run over the five slices (temperature T=2, the default);
- single: five single-task runs, each with the full budget on its own task;
- trl: a plain `trl.SFTTrainer` with hand-written prompts (no templates, no chat format), the same
  budget split equally over the five tasks, the same answers (our verbalised targets), LoRA settings,
  batch size, max length and schedule; evaluated on the same rows with the same hand-written prompts
  and scored by the same parsers and metrics;
- temperature: the multi-task run at T = 1, 2, 5 on an *imbalanced* version of the slices (each task
  capped in proportion to its full dataset's size: the 2,000-row slices alone are equal-sized, and
  with equal sizes every T gives the same mixture);
- transfer: RTE and AG News, never trained on, scored for the base model and the multi-task model,
  through their templates and through a free instruction (the `t2t-mtl prompt` path).
- one_variant: the multi-task run with each template reduced to its first training variant (the one
  every part evaluates), as the TRL baseline trains one prompt per task; tests whether prompt variety
  costs in-variant accuracy at this budget;
- plain_prompt: the multi-task run with `model.prompt_format: plain` (instruction and input as plain text, no
  chat template), as the TRL baseline's hand prompts are; tests whether the chat layout costs accuracy;
- truncation: the multi-task run again with `model.truncation: middle` (the default since layout 2) next
  to (b), which cuts the end of an over-long input. Every other part pins `end`, the setting its runs
  were measured with, so the cached runs and a fresh invocation give the same table.
Scores: each task's primary metric (accuracy, accuracy, SQuAD F1, span F1, ROUGE-L) on the first
--limit validation rows (AG News: its test file; the slice has no validation split).
Every run is a run folder under --work trained with `resume: auto` and every evaluation is cached
there, so an interrupted invocation continues where it stopped. Writes --out and the
"Multi-task quality" and "Zero-shot transfer" sections of --doc (with PNG plots next to it).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

PARTS = (
    "base",
    "multi",
    "transfer",
    "single",
    "temperature",
    "trl",
    "truncation",
    "one_variant",
    "plain_prompt",
)  # run in this order
# The input truncation the measured runs used: an over-long input lost its end (layout 1). The
# `truncation` part measures the current default, "middle"; re-running every part with it is left to do.
MEASURED_TRUNCATION = "end"
TEMPERATURES = (1.0, 2.0, 5.0)
# Training-set sizes of the full datasets (SST-2, SICK, SQuAD v1.1, CoNLL-2003, SciTLDR-A), scaled so the
# largest is the slice size: the imbalance the temperature benchmark mixes.
FULL_SIZES = {
    "sentiment_sst2": 67349,
    "nli_3way": 4439,
    "qa_squad": 87599,
    "ner_conll2003": 14041,
    "summarization": 1992,
}
SECTION_QUALITY = "## Multi-task quality"
SECTION_TRANSFER = "## Zero-shot transfer"
FREE_INSTRUCTIONS = {
    "nli_2way": (
        "Read the two texts. Does the first text imply that the second one is true? "
        "Reply with entailment or not_entailment."
    ),
    "topic_ag_news": "What is this news article about? Reply with one word: World, Sports, Business or Sci/Tech.",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------- runs


def run_config(
    args,
    name: str,
    tasks: list[dict],
    temperature: float = 2.0,
    truncation: str = MEASURED_TRUNCATION,
    prompt_format: str = "auto",
):
    """The default recipe with these tasks, this budget and a run folder under --work."""
    from t2t_mtl.core.config import load_config

    d = common.default_recipe()
    d.update(run_name=name, output_dir=str(Path(args.work) / name), tasks=tasks)
    d["model"]["truncation"] = truncation
    d["model"]["prompt_format"] = prompt_format
    d["mixing"]["temperature"] = temperature
    d["train"].update(
        steps=args.steps,
        batch_size=args.batch_size,
        save_steps=50,
        save_total_limit=1,
        resume="auto",
        bad_rows="skip",
    )
    d["eval"].update(every_steps=0, limit=args.limit, split="validation")
    return load_config(data=d)


def train_once(cfg) -> Path:
    """Train the run unless it already finished (an unfinished one resumes from its last checkpoint)."""
    from t2t_mtl.training import trainer

    run_dir = Path(cfg.output_dir)
    if (run_dir / "train_summary.json").is_file():
        return run_dir
    log(f"training {cfg.run_name} ({cfg.train.steps} steps x {cfg.train.batch_size})")
    t0 = time.time()
    trainer.train(cfg, eval_fn=None)
    log(f"trained {cfg.run_name} in {time.time() - t0:.0f} s")
    return run_dir


def eval_once(run_dir: Path, limit: int, tasks: list[str] | None = None) -> dict:
    """Validation scores of a trained run's final adapter (cached in RUN/eval/bench-validation-N.json)."""
    from t2t_mtl.evaluation.run_eval import evaluate_run

    name = f"bench-validation-{limit}"
    path = run_dir / "eval" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    log(f"evaluating {run_dir.name}")
    res, _ = evaluate_run(
        run_dir, split="validation", limit=limit, tasks=tasks, name=name, progress=False
    )
    return res


def _task(name: str) -> str:
    """A task named by its template file (a config entry giving a path) -> the template's name."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


def scores(res: dict) -> dict:
    """{task: primary score} of an evaluation result."""
    return {_task(t): e.get("primary") for t, e in res["tasks"].items()}


def invalid(res: dict) -> dict:
    """{task: % of answers the task's parser could not read} (format failures, scored as wrong)."""
    return {_task(t): e.get("invalid_rate") for t, e in res["tasks"].items()}


def entry(res: dict, **extra) -> dict:
    """A run's scores and invalid-answer rates, plus whatever else is given."""
    return {"scores": scores(res), "invalid": invalid(res), **extra}


def summary_of(run_dir: Path) -> dict:
    """Training time and throughput from the run's train_summary.json."""
    s = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
    sess = s.get("session", {})
    return {
        "steps": s.get("steps"),
        "seconds": s.get("seconds"),
        "final_loss": s.get("final_loss"),
        "final_task_loss": s.get("final_task_loss"),
        "input_tokens": sess.get("input_tokens"),
        "input_tokens_per_s": round(sess.get("tokens_per_s", 0.0), 1),
    }


# ------------------------------------------------------------------------- base model


def evaluate_cached(
    path: Path, label: str, load, cfg, limit: int, free: bool, mode: str | None = None
) -> dict:
    """`cfg`'s tasks scored for the model `load()` returns (model, tokenizer, prompt format), through their
    templates or (`free`) free instructions; `mode="rank"` scores the answer choices by likelihood instead
    of generating (no format failures possible). The result is cached in `path`."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from t2t_mtl.evaluation import evaluator

    log(f"evaluating {label}")
    model, tok, fmt = load()
    model.eval()
    res = (
        free_eval(model, tok, fmt, cfg, limit)
        if free
        else evaluator.evaluate(
            model,
            tok,
            fmt,
            evaluator.eval_tasks(cfg, mode=mode),
            split="validation",
            limit=limit,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            max_prompt_tokens=cfg.model.max_length,
            progress=False,
        )
    )
    common.write_json(path, res)
    return res


def base_eval(args, cfg, name: str, free: bool = False, mode: str | None = None) -> dict:
    """The untuned base model on `cfg`'s tasks (cached under WORK/base/)."""

    def load():
        from t2t_mtl.model import loading
        from t2t_mtl.model.prompt_format import PromptFormat

        model, tok, family = loading.load_model_and_tokenizer(cfg.model, None)
        return (
            model,
            tok,
            PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format, cfg.model.truncation),
        )

    return evaluate_cached(
        Path(args.work) / "base" / f"{name}.json",
        f"the base model: {name}",
        load,
        cfg,
        args.limit,
        free,
        mode,
    )


def free_eval(model, tok, fmt, cfg, limit: int) -> dict:
    """Each task's rows asked through a free instruction (not a template variant), scored by the template's
    parser and metric: what `t2t-mtl prompt --instruction ...` would answer."""
    import dataclasses

    from t2t_mtl.evaluation import evaluator
    from t2t_mtl.model.generation import generate_texts

    out = {"split": "validation", "limit": limit, "tasks": {}}
    for t in evaluator.eval_tasks(cfg):
        examples, _rows = evaluator.load_examples(t, "validation", limit)
        free = [
            dataclasses.replace(
                ex, record=dataclasses.replace(ex.record, instruction=FREE_INSTRUCTIONS[t.name])
            )
            for ex in examples
        ]
        texts = generate_texts(
            model,
            tok,
            fmt,
            [ex.record for ex in free],
            max_new_tokens=16,
            batch_size=cfg.eval.batch_size,
            max_prompt_tokens=cfg.model.max_length,
        )
        summary, preds = evaluator.score_task(t.template, free, texts)
        out["tasks"][t.name] = {
            "mode": "generate",
            "variant": "free-instruction",
            **summary,
            "examples": preds[:3],
        }
    return out


def run_model_eval(
    args, run_dir: Path, cfg, name: str, free: bool, mode: str | None = None
) -> dict:
    """A trained run's adapter on `cfg`'s tasks (not necessarily the run's own), cached under RUN/eval."""

    def load():
        from t2t_mtl.model.loading import load_for_inference
        from t2t_mtl.model.prompt_format import PromptFormat
        from t2t_mtl.runs.folder import Run

        model, tok, _family, manifest = load_for_inference(Run.load(run_dir).bundle_dir())
        return model, tok, PromptFormat.from_dict(manifest["prompt_format"])

    return evaluate_cached(
        run_dir / "eval" / f"{name}.json",
        f"{run_dir.name}: {name}",
        load,
        cfg,
        args.limit,
        free,
        mode,
    )


# ------------------------------------------------------------------------- TRL baseline


def _fit(tok, text: str, budget: int) -> str:
    """`text` cut to `budget` tokens (what a careful user does so the answer is never truncated)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tok.decode(ids[:budget])


def hand_prompt(task: str, row: dict, tok, budget: int = 180) -> str:
    """Hand-written plain-text prompts, one per task (the TRL baseline: no templates, no chat format)."""
    if task == "sentiment_sst2":
        return f"Review: {row['text']}\nSentiment (negative or positive):"
    if task == "nli_3way":
        return (
            f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\n"
            "Relation (entailment, neutral or contradiction):"
        )
    if task == "qa_squad":
        return f"Context: {_fit(tok, row['context'], budget)}\nQuestion: {row['question']}\nAnswer:"
    if task == "ner_conll2003":
        return f"Sentence: {' '.join(row['tokens'])}\nNamed entities (TYPE: name | ..., or none):"
    if task == "summarization":
        return f"Abstract: {_fit(tok, row['document'], budget)}\nOne-sentence summary:"
    raise KeyError(task)


def trl_part(args, cfg) -> dict:
    """Train (once) and evaluate the TRL baseline; results cached in WORK/trl/."""
    out_dir = Path(args.work) / "trl"
    res_path = out_dir / "eval.json"
    if res_path.is_file():
        return json.loads(res_path.read_text(encoding="utf-8"))
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    from t2t_mtl.evaluation import evaluator
    from t2t_mtl.model import loading
    from t2t_mtl.tasks import sources

    tasks = evaluator.eval_tasks(cfg)
    model, tok, _family = loading.load_model_and_tokenizer(cfg.model, None, for_training=True)
    adapter = out_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        per_task, rng, data = (
            args.steps * args.batch_size // len(tasks),
            random.Random(cfg.seed),
            [],
        )
        for t in tasks:
            rows = sources.load_rows(t.template, t.source, "train", bad_rows="skip")
            order = list(range(len(rows)))
            rng.shuffle(order)
            for i in order[:per_task]:
                row = rows[i]
                rec = t.template.render(row, t.variant_id(), row_id=str(i), split="train")
                data.append(
                    {"prompt": hand_prompt(t.name, row, tok), "completion": " " + rec.output}
                )
        rng.shuffle(data)
        tr, ad = cfg.train, cfg.adapter
        targs = SFTConfig(
            output_dir=str(out_dir / "trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=tr.learning_rate,
            weight_decay=tr.weight_decay,
            warmup_steps=tr.warmup_steps,
            lr_scheduler_type=tr.scheduler,
            max_grad_norm=tr.max_grad_norm,
            max_length=cfg.model.max_length,
            packing=False,
            completion_only_loss=True,
            bf16=False,
            fp16=False,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=cfg.seed,
            dataloader_num_workers=0,
        )
        lora = LoraConfig(
            r=ad.r,
            lora_alpha=ad.alpha,
            lora_dropout=ad.dropout,
            target_modules=ad.target_modules,
            task_type="CAUSAL_LM",
        )
        log(f"training trl ({args.steps} steps x {args.batch_size}, {len(data)} examples)")
        t0 = time.time()
        trainer = SFTTrainer(
            model=model,
            args=targs,
            train_dataset=Dataset.from_list(data),
            processing_class=tok,
            peft_config=lora,
        )
        trainer.train()
        trainer.model.save_pretrained(str(adapter))
        common.write_json(
            out_dir / "train_summary.json",
            {
                "steps": args.steps,
                "seconds": round(time.time() - t0, 1),
                "examples": len(data),
                "log": trainer.state.log_history,
            },
        )
        model = trainer.model
    else:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    log("evaluating trl")
    out = {"split": "validation", "limit": args.limit, "tasks": {}}
    for t in tasks:
        examples, rows = evaluator.load_examples(t, "validation", args.limit)
        prompts = [hand_prompt(t.name, rows[int(ex.record.meta["row_id"])], tok) for ex in examples]
        texts = greedy(model, tok, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        summary, preds = evaluator.score_task(t.template, examples, texts)
        out["tasks"][t.name] = {
            "mode": "generate",
            "variant": "hand-written",
            **summary,
            "examples": preds[:3],
        }
    common.write_json(res_path, out)
    return out


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


def one_variant_tasks(args, tasks: list[dict]) -> list[dict]:
    """`tasks` with each template copied to WORK/one_variant_templates/ keeping only its first training
    variant (same name, same variant id, so evaluation renders exactly what it renders for (b))."""
    import yaml

    from t2t_mtl.tasks.catalogue import load_task

    out_dir = Path(args.work) / "one_variant_templates"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for t in tasks:
        tpl = load_task(t["template"])
        src, d = tpl.path, copy.deepcopy(tpl.data)  # the merged data: includes resolved
        d.pop("include", None)
        d["variants"] = [v for v in d["variants"] if not v.get("heldout")][:1]
        d.pop(
            "samples", None
        )  # the slices replace the bundled samples (and the path was relative to src)
        dst = out_dir / src.name
        dst.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True), encoding="utf-8")
        out.append({**t, "template": str(dst)})
    return out


# ------------------------------------------------------------------------- truncation


def truncation_stats(cfg, limit: int) -> dict:
    """Per task, on the evaluated prompts (first `limit` validation rows, first variant, cut to
    model.max_length as evaluation does): % of prompts cut, and for SQuAD % whose question is gone,
    with the end and with the middle of the input cut. Tokenizer only; nothing is trained."""
    import dataclasses

    from t2t_mtl.evaluation import evaluator
    from t2t_mtl.model import loading
    from t2t_mtl.model.features import prompt_ids
    from t2t_mtl.model.prompt_format import PromptFormat

    _model, tok, family = loading.load_model_and_tokenizer(cfg.model, None)
    fmt = PromptFormat.for_tokenizer(tok, family, cfg.model.prompt_format)
    out = {}
    for t in evaluator.eval_tasks(cfg):
        examples, rows = evaluator.load_examples(t, "validation", limit)
        st = {"prompts": len(examples)}
        for side in ("end", "middle"):
            f = dataclasses.replace(fmt, truncation=side)
            cut = lost = 0
            for ex in examples:
                ids, c = prompt_ids(tok, f, ex.record, cfg.model.max_length)
                cut += c
                q = rows[int(ex.record.meta["row_id"])].get("question")
                lost += bool(c and q and q.strip() not in tok.decode(ids))
            st["cut_pct"] = round(
                100 * cut / max(len(examples), 1), 1
            )  # whether a prompt is cut: same for both
            if t.name == "qa_squad":
                st[f"question_lost_pct_{side}"] = round(100 * lost / max(len(examples), 1), 1)
        out[t.name] = st
    return out


# ------------------------------------------------------------------------- report


def imbalanced_caps(slice_rows: int = 2000) -> dict[str, int]:
    """Per-task training-row caps proportional to the full datasets' sizes (largest = the slice size)."""
    top = max(FULL_SIZES.values())
    return {t: max(20, round(slice_rows * n / top)) for t, n in FULL_SIZES.items()}


def mixture_shares(cfg) -> dict[str, float]:
    """The planned sampling shares of a run config's single stage (from the mixing module itself)."""
    from t2t_mtl.mixing import mixture

    plan = mixture.plan_stage(cfg, 0, mixture.build_members(cfg))
    return {m: round(r, 4) for m, r in plan.rates.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(common.DEFAULT_DATA))
    ap.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}"
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=100, help="validation rows per task")
    ap.add_argument(
        "--work", default=str(ROOT / "runs" / "bench_quality"), help="run folders (resumable cache)"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    data = Path(args.data_dir).resolve()
    errors = [
        f"error: unknown part '{p}' (choose from {', '.join(PARTS)})"
        for p in parts
        if p not in PARTS
    ]
    errors += common.check_data_dir(
        data, [f for _, f in common.SLICES] + [f for _, f, _ in common.HELDOUT_SLICES]
    )
    if errors:
        return common.report_errors(errors)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text(encoding="utf-8")) if out_path.is_file() else {}
    results.setdefault("runs", {})
    results["settings"] = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "examples": args.steps * args.batch_size,
        "data": str(data),
    }
    runs = results["runs"]

    def save() -> None:
        results["machine"] = common.machine(
            command="python bench/bench_quality.py " + " ".join(argv or sys.argv[1:])
        )
        common.write_json(out_path, results)

    all_tasks = common.slice_tasks(data)
    multi_cfg = run_config(args, "multi_T2", all_tasks)
    if "base" in parts:
        runs["base"] = entry(base_eval(args, multi_cfg, "validation"))
        save()
    if "multi" in parts:
        d = train_once(multi_cfg)
        runs["multi"] = entry(
            eval_once(d, args.limit), train=summary_of(d), shares=mixture_shares(multi_cfg)
        )
        save()
    if "transfer" in parts:
        tcfg = run_config(args, "transfer_eval", common.heldout_tasks(data))
        multi_dir = train_once(multi_cfg)
        tr = results.setdefault("transfer", {})
        for key, res in (
            ("base_template", base_eval(args, tcfg, "transfer-template")),
            ("base_free", base_eval(args, tcfg, "transfer-free", free=True)),
            (
                "multi_template",
                run_model_eval(args, multi_dir, tcfg, "transfer-template", free=False),
            ),
            ("multi_free", run_model_eval(args, multi_dir, tcfg, "transfer-free", free=True)),
            # ranked answer choices: knowledge without format failures
            ("base_rank", base_eval(args, tcfg, "transfer-rank", mode="rank")),
            (
                "multi_rank",
                run_model_eval(args, multi_dir, tcfg, "transfer-rank", free=False, mode="rank"),
            ),
        ):
            tr[key], tr[f"{key}_invalid"] = scores(res), invalid(res)
        save()
    if "single" in parts:
        for t in all_tasks:
            cfg = run_config(args, f"single_{t['template']}", [t])
            d = train_once(cfg)
            runs[f"single_{t['template']}"] = entry(eval_once(d, args.limit), train=summary_of(d))
            save()
    if "temperature" in parts:
        caps = imbalanced_caps()
        results["imbalanced_caps"] = caps
        for T in TEMPERATURES:
            cfg = run_config(
                args,
                f"imbalanced_T{T:g}",
                common.slice_tasks(data, max_examples=caps),
                temperature=T,
            )
            d = train_once(cfg)
            runs[f"imbalanced_T{T:g}"] = entry(
                eval_once(d, args.limit),
                train=summary_of(d),
                shares=mixture_shares(cfg),
                temperature=T,
            )
            save()
    if "trl" in parts:
        res = trl_part(args, multi_cfg)
        runs["trl"] = entry(res)
        tsum = Path(args.work) / "trl" / "train_summary.json"
        if tsum.is_file():
            runs["trl"]["train"] = {
                k: v for k, v in json.loads(tsum.read_text()).items() if k != "log"
            }
        save()
    if "truncation" in parts:
        cfg = run_config(args, "multi_T2_middle", all_tasks, truncation="middle")
        d = train_once(cfg)
        runs["multi_middle"] = entry(
            eval_once(d, args.limit), train=summary_of(d), shares=mixture_shares(cfg)
        )
        results["truncation_stats"] = truncation_stats(multi_cfg, args.limit)
        save()
    if "one_variant" in parts:
        cfg = run_config(args, "multi_T2_one_variant", one_variant_tasks(args, all_tasks))
        d = train_once(cfg)
        runs["multi_one_variant"] = entry(
            eval_once(d, args.limit), train=summary_of(d), shares=mixture_shares(cfg)
        )
        save()
    if "plain_prompt" in parts:
        cfg = run_config(args, "multi_T2_plain", all_tasks, prompt_format="plain")
        d = train_once(cfg)
        runs["multi_plain"] = entry(
            eval_once(d, args.limit), train=summary_of(d), shares=mixture_shares(cfg)
        )
        save()
    save()
    if not args.no_doc:
        import report_quality

        report_quality.write(results, Path(args.doc))
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
