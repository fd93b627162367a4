"""Answer with a trained run: `Predictor` (predict rows, prompt one example, free instructions) and `export`.

A Predictor renders rows with the run's own template copies and builds prompts with the run's
saved `PromptFormat` and `features.prompt_ids` (the training tokenisation), so the model sees
token for token what it saw in training. Rows are given in the template's field names (the
template's source `columns` map is applied too, so rows in the hub dataset's schema work);
only the fields the variant's instruction and input use are required (no answer needed).

Structured predictions by parse kind: label -> `{"label"}`; span -> `{"answer"}`; entities ->
`{"entities": [[TYPE, text], ...], "tags": [BIO, ...]}`; text -> `{"summary"}` (summarization)
or `{"text"}`; number -> `{"value"}` (a float); labels -> `{"labels": [...]}`. `None` values mean the output could not be parsed (`valid: false`).

`export` merges a LoRA adapter into a full-precision copy of the base model (never into 4-bit
weights) and saves a plain transformers model folder with the tokenizer and the manifest.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jinja2 import meta

from t2t_mtl import __version__
from t2t_mtl.core.config import AdapterConfig, ModelConfig
from t2t_mtl.core.errors import ConfigError, DataError, Problem, TemplateError
from t2t_mtl.core.files import atomic_open, swap_folder, temp_folder_beside
from t2t_mtl.core.records import Record
from t2t_mtl.evaluation.model_card import write_model_card
from t2t_mtl.model import loading  # used as loading.X: tests patch its loaders
from t2t_mtl.model.features import fitted_prompt, prompt_ids
from t2t_mtl.model.generation import generate_texts, place
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.runs.folder import Run
from t2t_mtl.tasks.parsing import Parsed
from t2t_mtl.tasks.schema import ENV
from t2t_mtl.tasks.sources import map_row
from t2t_mtl.tasks.task import Task

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    Loaded = tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase, str, dict[str, Any]]

__all__ = [
    "EXPORT_MARKER",
    "FREE_TASK",
    "RENDER_FORMS",
    "Predictor",
    "check_export_target",
    "export",
    "predict_file",
    "prompt_fields",
    "push_to_hub",
    "read_rows",
    "render_file",
    "structured",
]

Progress = Callable[[int], object]  # called with the number of records just answered

FREE_TASK = "free"  # task name of records built from a free instruction
RENDER_FORMS = ("text", "messages")  # Predictor.served_prompt / `t2t-mtl render --format`
_TYPES = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "dict": dict,
    "list": list,
    "list[str]": list,
    "list[label]": list,
    "label": str,
}


def prompt_fields(tpl: Task, variant_id: str) -> list[str]:
    """Fields the variant's instruction and input use (what a row must provide to be prompted)."""
    v = tpl.variant(variant_id)
    used: set[str] = set()
    for src in (v.instruction, v.input):
        used |= meta.find_undeclared_variables(ENV.parse(src or ""))
    return [f for f in tpl.fields if f in used]


def _close(word: str, candidates: list[str]) -> str:
    """The candidate closest to `word` when it is a near miss, else ""."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else ""


def structured(tpl: Task, parsed: Parsed) -> dict[str, Any]:
    """A parsed output as the structured prediction written by `predict` (see module docstring)."""
    if tpl.parse == "label":
        return {"label": parsed.value}
    if tpl.parse == "span":
        return {"answer": parsed.value or None}
    if tpl.parse == "entities":
        return {"entities": [list(e) for e in parsed.detail or []], "tags": list(parsed.value)}
    if tpl.parse == "number":
        return {"value": parsed.value}
    if tpl.parse == "labels":
        return {"labels": list(parsed.value or [])}
    key = "summary" if tpl.task_type == "summarization" else "text"
    return {key: parsed.value or None}


class Predictor:
    """A loaded model plus the run's templates and prompt format; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel | PeftModel | None,
        tokenizer: PreTrainedTokenizerBase | None,
        fmt: PromptFormat | None,
        *,
        run: Run | None = None,
        manifest: dict | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        max_prompt_tokens: int | None = None,
        loader: Callable[[], Loaded] | None = None,
        task_budgets: bool = False,
    ):
        self._model, self._tokenizer, self._fmt, self.run = model, tokenizer, fmt, run
        # A task's answers get the budget and first-line stop `t2t-mtl eval` gives them
        # (`evaluator.answer_budget`, at most max_new_tokens), so the same row gets the same answer.
        self.task_budgets = task_budgets and run is not None
        self._budgets: dict[str, tuple[int, bool]] = {}
        self._loader = loader  # () -> (model, tokenizer, family, manifest); called on first use
        self.manifest = manifest or {}
        self.max_new_tokens, self.batch_size, self.max_prompt_tokens = (
            max_new_tokens,
            batch_size,
            max_prompt_tokens,
        )

    @classmethod
    def from_run(
        cls,
        path: str | Path,
        base: bool = False,
        trust_remote_code: bool = False,
        **kw: Any,  # more Predictor() options, e.g. max_new_tokens
    ) -> Predictor:
        """A predictor for a run's final bundle (`base=True`: its untuned base model, with the same
        prompts and templates). The run folder is checked now; the model loads on first use, so
        bad input is reported before the slow part. `trust_remote_code`: the user's consent to
        run the model's remote code (a run that needs it is refused without; see
        `loading.remote_code_consent`)."""
        run = Run.load(path)
        bundle = run.bundle_dir()
        loading.remote_code_consent(loading.read_manifest(bundle), trust_remote_code, bundle)
        opts = {
            "max_new_tokens": run.cfg.eval.max_new_tokens,
            "batch_size": run.cfg.eval.batch_size,
            "max_prompt_tokens": run.cfg.model.max_length,
            # as eval: fitted budgets for a tuned model unless a budget is given; none for the base
            "task_budgets": run.cfg.eval.task_budgets and not base and "max_new_tokens" not in kw,
            **kw,
        }
        return cls(
            None,
            None,
            None,
            run=run,
            loader=lambda: loading.load_for_inference(
                bundle,
                base=base,
                trust_remote_code=trust_remote_code,
                merge=run.cfg.eval.merge_adapter,
            ),
            **opts,
        )

    @classmethod
    def for_prompts(cls, path: str | Path, trust_remote_code: bool = False, **kw: Any) -> Predictor:
        """A predictor that builds prompts without a model (`render`, `export-task`): the run's
        template copies, the prompt format saved in its final bundle's manifest and the bundle's
        tokenizer (for the training-time truncation). Generating with it is an error."""
        from transformers import AutoTokenizer  # tokenizer only: no model weights are read

        run = Run.load(path)
        bundle = run.bundle_dir()
        manifest = loading.read_manifest(bundle)
        remote = loading.remote_code_consent(manifest, trust_remote_code, bundle)
        tok = AutoTokenizer.from_pretrained(bundle, trust_remote_code=remote)
        opts = {
            "max_new_tokens": run.cfg.eval.max_new_tokens,
            "max_prompt_tokens": run.cfg.model.max_length,
            **kw,
        }
        fmt = PromptFormat.from_dict(manifest["prompt_format"])
        return cls(None, tok, fmt, run=run, manifest=manifest, **opts)

    def _load(self) -> None:
        if self._model is None and self._loader is not None:
            model, self._tokenizer, _family, self.manifest = self._loader()
            self._model = place(model)
            self._fmt = PromptFormat.from_dict(self.manifest["prompt_format"])

    @property
    def model(self) -> PreTrainedModel | PeftModel:
        """The model (loaded on first use)."""
        self._load()
        if self._model is None:
            raise RuntimeError("this predictor only builds prompts (Predictor.for_prompts)")
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (loaded with the model)."""
        self._load()
        return self._tokenizer

    @property
    def fmt(self) -> PromptFormat:
        """The run's prompt format (from the bundle manifest)."""
        self._load()
        return self._fmt

    # ------------------------------------------------------------------ rendering

    def template(self, task: str) -> Task:
        """The run's template of `task` (unknown tasks: ConfigError with "did you mean")."""
        if self.run is None:
            raise ConfigError(
                Problem(
                    "<predictor>",
                    None,
                    "this predictor has no run, so no task templates",
                    "use Predictor.from_run, or .ask() for free instructions",
                )
            )
        return self.run.template(task)

    def render(
        self, task: str, row: dict, *, variant: str | None = None, where: str = "<row>"
    ) -> Record:
        """One input row -> Record (no answer); problems raise DataError naming `where`."""
        recs, problems = self.render_rows(task, [(where, row)], variant)
        if problems:
            raise DataError(problems)
        return recs[0]

    def render_rows(
        self, task: str, rows: Sequence[tuple[str, Any]], variant: str | None = None
    ) -> tuple[list[Record | None], list[Problem]]:
        """Render (`file:line`, row) pairs; returns records aligned with `rows` (None for a bad row)
        and one problem per bad row (missing or mistyped prompt fields, template errors)."""
        tpl = self.template(task)
        vid = variant or tpl.train_variants()[0].id
        tpl.variant(vid)  # unknown variant: TemplateError before any row
        needed = prompt_fields(tpl, vid)
        columns = dict(tpl.source.get("columns") or {})
        labels = dict(tpl.source.get("labels") or {})
        recs: list[Record | None] = []
        problems: list[Problem] = []
        for where, raw in rows:
            file, _, line = where.rpartition(":")
            loc = (file, int(line)) if line.isdigit() else (where, None)
            recs.append(None)
            if not isinstance(raw, dict):
                problems.append(
                    Problem(
                        *loc,
                        f"expected a JSON object with the fields of '{task}', "
                        f"got {type(raw).__name__}",
                    )
                )
                continue
            # The same column/label mapping as training's sources, so rows in the hub schema work
            # (e.g. SST-2's `sentence` and integer labels); a gold label is never needed to predict.
            row, _ = map_row(raw, columns, labels, tpl.label_field, tpl.fields)
            extra = [str(k) for k in raw if k not in columns and k not in tpl.fields]
            bad = [
                (f"field '{f}' is null" if _written(f, raw, columns) else f"missing field '{f}'")
                + (f" (the row has '{c}': misspelt?)" if (c := _close(f, extra)) else "")
                for f in needed
                if row.get(f) is None and (f not in tpl.fields or tpl.fields[f].required)
            ]
            for f in needed:
                spec = tpl.fields.get(f)
                if (
                    spec is not None
                    and row.get(f) is not None
                    and not isinstance(row[f], _TYPES.get(spec.type, object))
                ):
                    bad.append(f"field '{f}' should be {spec.type}, got {type(row[f]).__name__}")
                elif (  # as training's rows: a required text may not be empty
                    spec is not None
                    and spec.type == "str"
                    and spec.required
                    and isinstance(row.get(f), str)
                    and not row[f].strip()
                ):
                    bad.append(f"empty text in field '{f}'")
            if tpl.parse == "entities" and not bad and not isinstance(row.get("tokens"), list):
                bad.append(
                    "missing field 'tokens' (the sentence's tokens, needed to align entities)"
                )
            elif tpl.parse == "entities" and not bad and not row["tokens"]:
                bad.append("field 'tokens' is an empty list: the sentence has no words to tag")
            if bad:
                problems.append(
                    Problem(*loc, "; ".join(bad), f"'{task}' prompts use: {', '.join(needed)}")
                )
                continue
            ctx = {
                f: row.get(f) for f in tpl.fields
            }  # absent optional fields are None, as in training
            try:
                rec = tpl.render(
                    ctx, vid, row_id=str(loc[1] or len(recs)), split="predict", with_output=False
                )
                if tpl.parse == "entities":  # parsing aligns entities to the (mapped) row's tokens
                    rec.meta["tokens"] = [str(t) for t in row["tokens"]]
                recs[-1] = rec
            except TemplateError as e:
                problems.append(Problem(*loc, e.problems[0].message, e.problems[0].hint))
        return recs, problems

    def prompt_ids(self, record: Record) -> list[int]:
        """The prompt token ids the model is given for `record` (training's tokenisation)."""
        return prompt_ids(self.tokenizer, self.fmt, record, self.max_prompt_tokens)[0]

    def served_prompt(self, record: Record, form: str = "text") -> dict[str, Any]:
        """What a server must be sent to prompt an exported model as training did, for `record`:
        `{"prompt": text}` (form "text": the whole prompt text, chat template and special tokens
        included; tokenised without adding special tokens for causal models, it gives exactly
        `prompt_ids(record)`) or `{"messages": [{"role": "user", "content": ...}]}` (form
        "messages", chat formats only: the chat template turns them into that text). Either also
        has `truncated`: the input was shortened to the run's prompt budget, as in training."""
        if form not in RENDER_FORMS:
            raise ValueError(f"form must be one of {RENDER_FORMS}, not {form!r}")
        fmt = self.fmt
        if form == "messages" and fmt.kind != "chat":
            raise ConfigError(
                Problem.at(
                    "<cli>",
                    f"--format messages needs a chat prompt format; this run's is '{fmt.kind}'",
                    "use --format text (the raw prompt text the model was trained on)",
                )
            )
        ids, used = fitted_prompt(self.tokenizer, fmt, record, self.max_prompt_tokens)
        if used is None:  # even the instruction alone is over budget: only the ids exist
            if form == "messages":
                raise DataError(
                    Problem.at(
                        "<row>",
                        f"the instruction alone is longer than the run's {self.max_prompt_tokens}"
                        "-token prompt budget, so training cut the prompt's tokens",
                        "use --format text for this row",
                    )
                )
            text = self.tokenizer.decode(
                ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            return {"prompt": text, "truncated": True}
        out: dict[str, Any]
        if form == "messages":
            out = {"messages": [{"role": "user", "content": fmt.user_message(used)}]}
        else:
            out = {"prompt": fmt.prompt(used)}
        out["truncated"] = used is not record
        return out

    # ------------------------------------------------------------------ answering

    def generate(
        self, records: Sequence[Record], progress: Progress | None = None, task: str | None = None
    ) -> list[str]:
        """Greedy answers for records (batched); `task`: records of that task, answered with its
        budget and stop as `t2t-mtl eval` answers them (`task_budgets`)."""
        budget, first_line = self.budget(task) if task is not None else (self.max_new_tokens, False)
        return generate_texts(
            self.model,
            self.tokenizer,
            self.fmt,
            records,
            max_new_tokens=budget,
            batch_size=self.batch_size,
            max_prompt_tokens=self.max_prompt_tokens,
            progress=progress,
            stop_after_line=first_line,
        )

    def budget(self, task: str) -> tuple[int, bool]:
        """(max new tokens, stop after the first line) for `task`'s answers: eval's fitted budget
        and first-line stop with `task_budgets`, else max_new_tokens and no stop."""
        if not self.task_budgets:
            return self.max_new_tokens, False
        if task not in self._budgets:
            from t2t_mtl.evaluation.evaluator import FIRST_LINE_KINDS, answer_budget, eval_tasks

            (et,) = eval_tasks(self.run.cfg, names=[task], template_dir=self.run.dir / "templates")
            budget, _ = answer_budget(et, self.tokenizer, self.fmt, self.max_new_tokens)
            self._budgets[task] = (budget, et.template.parse in FIRST_LINE_KINDS)
        return self._budgets[task]

    def _answer(
        self,
        task: str,
        rows: list[tuple[str, dict]],
        recs: list[Record],
        progress: Progress | None = None,
    ) -> list[dict]:
        tpl = self.template(task)
        texts = self.generate(recs, progress, task=task)
        out = []
        for (_where, row), rec, text in zip(rows, recs, texts):
            parsed = (
                tpl.parse_output(text, tokens=rec.meta["tokens"])
                if tpl.parse == "entities"
                else tpl.parse_output(text)
            )
            item = {
                "task": task,
                "variant": rec.meta.get("variant"),
                "raw": text,
                "prediction": structured(tpl, parsed),
                "valid": parsed.valid,
            }
            if isinstance(row, dict) and row.get("id") is not None:
                item["id"] = row["id"]
            out.append(item)
        return out

    def predict(
        self,
        task: str,
        rows: Sequence[dict],
        *,
        variant: str | None = None,
        progress: Progress | None = None,
        where: Sequence[str] | None = None,
    ) -> list[dict]:
        """Structured predictions for `rows` (dicts of the task's fields), in order.

        Every bad row is reported at once (DataError; `where[i]` names row i, e.g. `file:line`).
        """
        where = list(where) if where is not None else [f"<rows>:{i + 1}" for i in range(len(rows))]
        pairs = list(zip(where, rows))
        recs, problems = self.render_rows(task, pairs, variant)
        if problems:
            raise DataError(problems)
        return self._answer(task, pairs, recs, progress)

    def prompt(self, task: str, variant: str | None = None, **fields: Any) -> dict:
        """Answer one example of `task` given its fields; returns the prediction dict (raw + structured)."""
        rec = self.render(task, fields, variant=variant, where="<fields>")
        return self._answer(task, [("<fields>", fields)], [rec])[0]

    def ask(self, instruction: str, input: str = "") -> str:
        """Answer a free instruction (same prompt layout as training, no task template)."""
        if not instruction.strip() and not input.strip():
            raise ConfigError(
                Problem("<cli>", None, "empty instruction", "give --instruction TEXT")
            )
        return self.generate([Record(FREE_TASK, instruction, input, "", {})])[0]


# ------------------------------------------------------------------ predict files


def _written(field: str, raw: dict, columns: dict) -> bool:
    """Whether the input row holds `field` (under its own name or a column mapped to it)."""
    return field in raw or any(dst == field and src in raw for src, dst in columns.items())


def read_rows(path: str | Path) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """JSONL input rows as (`file:line`, object); lines that are not UTF-8 or not JSON become
    problems; a file without any row is a DataError."""
    path = Path(path)
    if path.is_dir():
        raise DataError(Problem(str(path), None, "is a folder", "give a JSONL file of rows"))
    if not path.is_file():
        raise DataError(Problem(str(path), None, "input file not found"))
    rows, problems = [], []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff" if n == 1 else "")
            except UnicodeDecodeError as e:
                col = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
                problems.append(
                    Problem(
                        str(path), n, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {col}"
                    )
                )
                continue
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(
                    Problem(str(path), n, f"not valid JSON: {e.msg} (column {e.colno})")
                )
            except (ValueError, RecursionError) as e:
                problems.append(Problem(str(path), n, f"not valid JSON: {e}"))
    if not rows and not problems:
        raise DataError(Problem(str(path), None, "the file is empty: no rows to predict"))
    return rows, problems


def _stop_on_bad_rows(problems: list[Problem], bad_rows: str, input_path: str | Path) -> None:
    """Under `bad_rows: fail`, any bad row stops the command before anything is written."""
    if problems and bad_rows == "fail":
        raise DataError(
            problems
            + [
                Problem(
                    str(input_path),
                    None,
                    f"{len(problems)} bad row(s); nothing written",
                    "fix them, or pass --bad-rows skip",
                )
            ]
        )


def predict_file(
    pred: Predictor,
    task: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    variant: str | None = None,
    bad_rows: str = "fail",
    progress: Progress | None = None,
) -> tuple[int, list[Problem]]:
    """Predict every row of a JSONL file and write JSONL (atomically; each output line names its
    input `line`). `bad_rows="fail"`: any bad row -> DataError listing all, nothing written;
    "skip": bad rows are left out and returned as problems. Returns (rows written, problems)."""
    rows, problems = read_rows(input_path)
    recs, bad = pred.render_rows(task, rows, variant)
    problems = sorted(problems + bad, key=lambda p: p.line or 0)
    _stop_on_bad_rows(problems, bad_rows, input_path)
    good = [(w, r, rec) for (w, r), rec in zip(rows, recs) if rec is not None]
    out = (
        pred._answer(task, [(w, r) for w, r, _ in good], [rec for _, _, rec in good], progress)
        if good
        else []
    )
    for (w, _, _), item in zip(good, out):
        item["line"] = int(w.rpartition(":")[2])
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output_path) as f:
        for item in out:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return len(out), problems


def render_file(
    pred: Predictor,
    task: str,
    input_path: str | Path,
    *,
    form: str = "text",
    variant: str | None = None,
    bad_rows: str = "fail",
) -> tuple[list[dict], list[Problem]]:
    """The served prompt (`Predictor.served_prompt`) of every row of a JSONL file, in order: one
    dict per good row with `task`, `line` (of the input), the row's `id` when it has one, then
    `prompt` or `messages` and `truncated`. Bad rows as in `predict_file` (`bad_rows="fail"`: a
    DataError listing all of them; "skip": returned as problems)."""
    rows, problems = read_rows(input_path)
    recs, bad = pred.render_rows(task, rows, variant)
    problems += bad
    out = []
    for (where, row), rec in zip(rows, recs):
        if rec is None:
            continue
        line = int(where.rpartition(":")[2])
        try:
            served = pred.served_prompt(rec, form)
        except DataError as e:
            problems += [Problem(str(input_path), line, p.message, p.hint) for p in e.problems]
            continue
        item: dict[str, Any] = {"task": task, "line": line}
        if isinstance(row, dict) and row.get("id") is not None:
            item["id"] = row["id"]
        out.append({**item, **served})
    problems = sorted(problems, key=lambda p: p.line or 0)
    _stop_on_bad_rows(problems, bad_rows, input_path)
    return out, problems


# ------------------------------------------------------------------ export

EXPORT_MARKER = "t2t_export.json"  # written into every export: what `--force` may replace


def check_export_target(out: Path, force: bool) -> None:
    """Refuse an export folder that must not be replaced (ConfigError naming it, why and the fix).

    A missing or empty folder is fine. A non-empty one needs `force`, and even then only an
    earlier export (a folder holding EXPORT_MARKER) is replaced: `--force --out ~` must never
    delete a home folder.
    """
    fix = "choose an empty or new folder"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        what = "a symbolic link" if out.is_symlink() else "a file, not a folder"
        raise ConfigError(Problem(str(out), None, f"the export target is {what}", fix))
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(
            Problem(
                str(out),
                None,
                "output folder exists and is not empty",
                f"{fix}, or pass --force to replace an earlier export",
            )
        )
    if not (out / EXPORT_MARKER).is_file():
        raise ConfigError(
            Problem(
                str(out),
                None,
                f"refusing to replace this folder: it is not an earlier export (no {EXPORT_MARKER})"
                " and --force replaces only those",
                fix,
            )
        )


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge the run's adapter into a full-precision copy of its base model and save a standard
    transformers folder (weights, config, tokenizer, `t2t_manifest.json`, EXPORT_MARKER) at
    `out_dir`.

    QLoRA runs: the base is reloaded in `dtype` (default bfloat16 if that was the compute dtype,
    else float32), never merged into 4-bit weights. Written to a temporary sibling and swapped
    in, so a failed export leaves an earlier one whole. `force` replaces only an earlier export
    (`check_export_target`); `trust_remote_code` is the user's consent to run the model's remote
    code (`loading.remote_code_consent`).
    """
    # peft and transformers' classes take seconds to import; of this module only export needs them
    from peft import PeftModel
    from transformers import AutoTokenizer

    run = Run.load(run_dir)
    bundle = run.bundle_dir()
    out = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." has a name and a parent
    check_export_target(out, force)
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(
            Problem(
                "<cli>",
                None,
                f"--dtype: invalid value {dtype!r}",
                "expected one of: float32, bfloat16, float16",
            )
        )
    manifest = loading.read_manifest(bundle)
    remote = loading.remote_code_consent(manifest, trust_remote_code, bundle)
    mfields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in manifest["model"].items() if k in mfields})
    model_cfg.trust_remote_code = remote
    adapter = AdapterConfig(
        **{
            k: v
            for k, v in manifest.get("adapter", {}).items()
            if k in {f.name for f in dataclasses.fields(AdapterConfig)}
        }
    )
    kind = manifest.get("bundle", {}).get("kind", "adapter")
    if dtype is None:
        dtype = model_cfg.dtype if model_cfg.dtype != "auto" else "float32"
        if adapter.method == "qlora":
            dtype = "bfloat16" if adapter.compute_dtype == "bfloat16" else "float32"
    if kind == "full":  # full fine-tuning: the bundle holds every weight already
        model = loading.load_for_inference(bundle, trust_remote_code=remote)[0].to(
            getattr(torch, dtype)
        )
    else:
        # adapter_cfg=None loads a plain (not quantised) base: the merge happens in `dtype`.
        model, _, _ = loading.load_model_and_tokenizer(
            dataclasses.replace(model_cfg, dtype=dtype), None, for_training=False
        )
        model = PeftModel.from_pretrained(model, str(bundle)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(bundle, trust_remote_code=model_cfg.trust_remote_code)
    with temp_folder_beside(out) as tmp:
        with torch.no_grad():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        data = {
            **manifest,
            "model": {**manifest["model"], "dtype": dtype},
            "bundle": {
                "kind": "full",
                "format": 1,
                "merged_from": str(bundle.resolve()),
                "adapter_method": adapter.method if kind != "full" else "full",
            },
        }
        (tmp / loading.MANIFEST).write_text(
            json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        marker = {
            "run": str(run.dir.resolve()),
            "bundle": str(bundle.resolve()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "t2t_mtl_version": __version__,
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        write_model_card(run.dir, tmp, kind="merged")  # README.md: the Hub model card
        check_export_target(out, force)  # again: the folder may have changed while we merged
        swap_folder(tmp, out)
    return out


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an export folder (model, tokenizer, README.md model card, manifest) to the Hugging
    Face Hub model repo `repo_id`, creating it when missing (`HfApi.create_repo` +
    `upload_folder`); returns the commit URL. Credentials come from huggingface_hub (`hf auth
    login` or $HF_TOKEN). A bad repo id, a missing token or a failed upload is a ConfigError."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(
            Problem.at(
                "<cli>",
                f"--push-to-hub: {repo_id!r} is not a Hub repo id: {e}",
                "e.g. your-name/smollm2-multitask",
            )
        ) from None
    if not (folder / EXPORT_MARKER).is_file():
        raise ConfigError(
            Problem.at(
                str(folder),
                f"not a t2t-mtl export (no {EXPORT_MARKER})",
                "export a run first: t2t-mtl export --run RUN --out DIR",
            )
        )
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload {folder.name} (t2t-mtl export)",
        )
    except Exception as e:  # huggingface_hub raises many types (auth, HTTP, network)
        raise ConfigError(
            Problem.at(
                "<hub>",
                f"--push-to-hub {repo_id}: {type(e).__name__}: {e}",
                "log in with `hf auth login` (or set HF_TOKEN) and check the network; "
                f"the export in {folder} is complete, push it again later",
            )
        ) from None
    return str(getattr(info, "commit_url", info))
