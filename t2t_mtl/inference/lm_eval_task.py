"""Export one task as an lm-evaluation-harness task folder (`t2t-mtl export-task T --to lm-eval DIR`).

What lands in DIR (several tasks may share one folder):

- `<task>.yaml`: the lm-eval task config (format of lm-eval 0.4: `task`, `dataset_path: json` with
  `dataset_kwargs.data_files` naming the data file below by absolute path, `test_split`,
  `output_type`, `doc_to_text`, `doc_to_target`, `generation_kwargs` with `until`,
  `process_results` and `metric_list` with the aggregations in utils.py, `metadata`);
- `<task>.<split>.jsonl`: one document per evaluation row, in `t2t-mtl eval`'s order: `prompt` is
  the exact prompt text training used (`Predictor.served_prompt`: chat template and special tokens
  included, the input shortened to the run's prompt budget as in training), `target` the rendered
  answer, `gold` what scoring compares against (`evaluator.gold_for`), `tokens` for NER, and for
  rank-mode label tasks `choices` (each answer choice's training target text) and `label`;
- `templates/`: copies of the task's template files (the parser reads them);
- `t2t_tasks.json`: per task the template copy, eval mode, metric result keys and reply prefix;
- `utils.py`: `process_results` and one aggregation per metric key. It imports t2t-mtl and scores
  with `evaluator.score_task` (the template's parser, e.g. the tolerant label parse or the NER
  linearisation, and t2t-mtl's metrics: span F1, SQuAD F1, ROUGE), so lm-eval's numbers equal
  `t2t-mtl eval`'s on the same rows and model. The environment running lm-eval needs t2t-mtl.

Prompt and generation parity: `doc_to_text` is the `prompt` column as it is (no lm-eval chat
template: do not pass `--apply_chat_template`, the text already holds it), `until` is the trained
end-of-turn text, `max_gen_toks` the task's budget as `t2t-mtl eval` computes it
(`evaluator.answer_budget`, at most `eval.max_new_tokens`), greedy. Rank-mode tasks become
`multiple_choice` tasks whose choices are the training targets, with no target delimiter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from t2t_mtl.core.config import RunConfig, load_config
from t2t_mtl.core.errors import ConfigError, Problem
from t2t_mtl.core.files import atomic_write_json, atomic_write_text, read_json_object
from t2t_mtl.core.records import Record
from t2t_mtl.evaluation.evaluator import answer_budget, eval_tasks, load_examples
from t2t_mtl.inference.predictor import Predictor
from t2t_mtl.runs.folder import copy_templates

__all__ = ["RESULT_KEYS", "TASKS_FILE", "UTILS", "export_lm_eval"]

TASKS_FILE = "t2t_tasks.json"
# metric name (template `metric:`) -> the result keys `metrics.compute` returns for it
RESULT_KEYS = {
    "accuracy": ["accuracy"],
    "macro_f1": ["macro_f1"],
    "squad": ["exact_match", "f1"],
    "span_f1": ["span_precision", "span_recall", "span_f1"],
    "rouge": ["rouge1", "rouge2", "rougeL"],
    "set_f1": ["set_precision", "set_recall", "set_f1"],
    "bleu": ["bleu"],
    "chrf": ["chrf"],
    "pearson": ["pearson"],
    "spearman": ["spearman"],
}
_ALL_KEYS = [k for keys in RESULT_KEYS.values() for k in keys] + ["invalid_rate"]

UTILS = '''"""lm-evaluation-harness hooks for tasks exported by `t2t-mtl export-task` (written by t2t-mtl;
rewritten by every export into this folder).

Each document's answer is parsed with its task's own template (the copy in templates/) and scored
with `t2t_mtl.evaluation.evaluator.score_task`, the code `t2t-mtl eval` uses, so the numbers are
t2t-mtl's (0-100). Needs t2t-mtl installed where lm-eval runs.
"""

import json
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def _task(name):
    from t2t_mtl.tasks.task import load_task_file

    info = json.loads((HERE / "{tasks_file}").read_text(encoding="utf-8"))[name]
    # Only parsing and scoring: the rows are the exported jsonl, so the copy's data paths may be gone.
    return info, load_task_file(HERE / info["template_file"], require_data=False)


def _answer(info, results):
    if info["mode"] == "rank":
        return [float(r[0]) for r in results]  # one log-likelihood per answer choice
    text = results[0]
    prefix = info.get("answer_prefix") or ""
    if prefix and text.startswith(prefix):  # the reply frame some chat templates write first
        text = text[len(prefix):]
    return text.strip()


def process_results(doc, results):
    info, _ = _task(doc["t2t_task"])
    item = (doc["t2t_task"], _answer(info, results), doc["gold"], doc.get("tokens"), doc["row_id"])
    return {{key: item for key in info["result_keys"] + ["invalid_rate"]}}


def _score(items):
    from t2t_mtl.core.records import Record
    from t2t_mtl.evaluation.evaluator import Example, score_task

    info, tpl = _task(items[0][0])
    examples = [
        Example(Record(name, "", "", "", {{"row_id": row_id}}), gold, tokens, key=str(row_id))
        for name, _, gold, tokens, row_id in items
    ]
    if info["mode"] == "rank":
        choices = list(tpl.answer_choices)
        ranked = []
        for _, lls, _, _, _ in items:
            best = max(range(len(lls)), key=lambda i: lls[i])
            ranked.append(SimpleNamespace(choice=choices[best], scores=dict(zip(choices, lls))))
        summary, _ = score_task(tpl, examples, ranked=ranked)
    else:
        summary, _ = score_task(tpl, examples, [answer for _, answer, _, _, _ in items])
    return {{**summary["metrics"], "invalid_rate": summary["invalid_rate"]}}


def _aggregation(key):
    def aggregate(items):
        return _score(items)[key]

    aggregate.__name__ = f"agg_{{key}}"
    return aggregate


{aggregations}
'''


class _Fn(str):
    """A YAML `!function module.name` value (lm-eval's tag for Python hooks)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Fn, lambda d, v: d.represent_scalar("!function", str(v)))


def _utils_text() -> str:
    aggs = "\n".join(f'agg_{k} = _aggregation("{k}")' for k in _ALL_KEYS)
    return UTILS.format(tasks_file=TASKS_FILE, aggregations=aggs)


def _predictor_for(
    run_dir: str | Path | None,
    config: str | Path | None,
    overrides: list[str] | None,
    trust_remote_code: bool,
) -> tuple[Predictor, RunConfig, Path | None]:
    """(prompt-only predictor, run config, template copies folder) from a run or a run config."""
    if (run_dir is None) == (config is None):
        raise ConfigError(
            Problem.at(
                "<cli>",
                "give either --run RUN (its templates and saved prompt format) or --config CFG",
                "e.g. --run runs/default",
            )
        )
    if run_dir is not None:
        pred = Predictor.for_prompts(run_dir, trust_remote_code=trust_remote_code)
        return pred, pred.run.cfg, pred.run.dir / "templates"
    # A config names a base model: its tokenizer decides the prompt format, as training would.
    from transformers import AutoTokenizer

    from t2t_mtl.model import loading
    from t2t_mtl.model.prompt_format import PromptFormat

    cfg = load_config(config, overrides)
    mc = cfg.model
    path, kwargs, hf_config = loading.resolve_model(mc.name, mc.trust_remote_code)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=mc.trust_remote_code, **kwargs)
    family = loading.detect_family(hf_config, mc.family, mc.name)
    fmt = PromptFormat.for_tokenizer(tok, family, mc.prompt_format, mc.truncation)
    pred = Predictor(
        None, tok, fmt, max_new_tokens=cfg.eval.max_new_tokens, max_prompt_tokens=mc.max_length
    )
    return pred, cfg, None


_YAML_MARK = "# lm-evaluation-harness task written by `t2t-mtl export-task"


def export_folder_problem(out: Path, task: str) -> str:
    """Why exporting `task` into `out` could destroy a file export-task did not write ("" when it
    cannot): the folder must be new, empty, or an earlier export folder (its t2t_tasks.json index),
    where the task's YAML and utils.py, if present, are the ones an export wrote."""
    if not out.is_dir() or not any(out.iterdir()):
        return ""
    index = read_json_object(out / TASKS_FILE)
    if index is None or not all(
        isinstance(v, dict) and "template_file" in v for v in index.values()
    ):
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        return (
            f"holds files export-task did not write ({shown}): exporting there would write "
            "task YAML, utils.py and templates/ over them"
        )
    for name, mark in ((f"{task}.yaml", _YAML_MARK), ("utils.py", UTILS[:60])):
        f = out / name
        if f.is_file() and not f.read_text(encoding="utf-8", errors="replace").startswith(mark):
            return f"{f} was not written by export-task: exporting would replace it"
    return ""


def export_lm_eval(
    task: str,
    out_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    split: str | None = None,
    limit: int | None = None,
    variant: str | None = None,
    mode: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Write the lm-eval task folder for `task` (see the module docstring); returns the YAML path.

    The rows are those `t2t-mtl eval` scores (`split`, default the config's eval.split; the first
    `limit` rows), rendered with `variant` (default the first training variant) and, for label
    tasks, evaluated in `mode` (default the task's eval mode).
    """
    pred, cfg, copies = _predictor_for(run_dir, config, overrides, trust_remote_code)
    (et,) = eval_tasks(cfg, names=[task], template_dir=copies, mode=mode, variant=variant)
    split = split or cfg.eval.split
    why = export_folder_problem(Path(out_dir).expanduser(), task)
    if why:
        raise ConfigError(
            Problem(
                "<cli>",
                None,
                f"DIR {out_dir}: {why}",
                "give a new or empty folder, or one an earlier export-task wrote",
            )
        )
    examples, rows = load_examples(et, split, limit, bad_rows=cfg.train.bad_rows)
    if not examples:
        raise ConfigError(
            Problem.at("<cli>", f"task '{task}' has no rows in split '{split}' to export")
        )
    tpl, fmt = et.template, pred.fmt
    rank = et.mode == "rank"
    docs = []
    for ex in examples:
        rec = ex.record
        doc: dict[str, Any] = {
            "t2t_task": task,
            "row_id": rec.meta.get("row_id"),
            "prompt": pred.served_prompt(rec, "text")["prompt"],
            "target": rec.output,
            "gold": ex.gold,
            "tokens": ex.tokens,
        }
        if rank:
            choices = list(tpl.answer_choices)
            doc["choices"] = [fmt.target(Record(task, "", "", c)) for c in choices]
            doc["label"] = choices.index(rec.output) if rec.output in choices else 0
        docs.append(doc)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task}.{split}.jsonl"
    atomic_write_text(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    template_file = copy_templates(out, {task: tpl})[task]
    index_path = out / TASKS_FILE
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
    keys = [k for m in tpl.metric for k in RESULT_KEYS[m]]
    index[task] = {
        "template_file": template_file,
        "template": tpl.name,
        "version": tpl.version,
        "variant": et.variant_id(),
        "mode": et.mode,
        "split": split,
        "rows": len(docs),
        "skipped_rows": rows.skipped,
        "result_keys": keys,
        "answer_prefix": "" if fmt.kind == "seq2seq" else fmt.answer_prefix,
        "prompt_format": fmt.kind,
        "source": str(run_dir) if run_dir is not None else str(config),
    }
    atomic_write_json(index_path, index, indent=1)
    atomic_write_text(out / "utils.py", _utils_text())
    conf: dict[str, Any] = {
        "task": task,
        "tag": ["t2t_mtl"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "num_fewshot": 0,
        "output_type": "multiple_choice" if rank else "generate_until",
        "doc_to_text": "prompt",  # a column name: its text as it is (it holds the chat template)
    }
    if rank:
        conf.update(doc_to_target="label", doc_to_choice="choices", target_delimiter="")
    else:
        stop = [fmt.answer_suffix] if fmt.kind != "seq2seq" and fmt.answer_suffix else []
        # the task's own budget, as `t2t-mtl eval` gives it (`evaluator.answer_budget`)
        budget, _ = answer_budget(et, pred.tokenizer, fmt, int(pred.max_new_tokens))
        conf.update(
            doc_to_target="target",
            target_delimiter="",
            generation_kwargs={
                "until": stop,
                "max_gen_toks": int(budget),
                "do_sample": False,
            },
        )
    conf["process_results"] = _Fn("utils.process_results")
    conf["metric_list"] = [
        {"metric": k, "aggregation": _Fn(f"utils.agg_{k}"), "higher_is_better": True} for k in keys
    ] + [
        {
            "metric": "invalid_rate",
            "aggregation": _Fn("utils.agg_invalid_rate"),
            "higher_is_better": False,
        }
    ]
    conf["metadata"] = {"version": float(tpl.version), "t2t_mtl_variant": et.variant_id()}
    head = (
        f"{_YAML_MARK} {task} --to lm-eval`:\n"
        f"# {len(docs)} rows of split '{split}' of task '{task}' (template {tpl.name} v{tpl.version}, "
        f"variant {et.variant_id()}, {et.mode}).\n"
        f"# Run: lm_eval --model hf --model_args pretrained=MODEL --include_path {out} "
        f"--tasks {task}\n"
    )
    path = out / f"{task}.yaml"
    atomic_write_text(
        path, head + yaml.dump(conf, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    )
    return path
