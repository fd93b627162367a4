"""A Hugging Face Hub model card (`README.md` with YAML metadata) for a run's model (no torch).

`model_card(run_dir, kind=...)` reads the run folder (config, final bundle manifest, template copies,
train_summary.json, eval results) and writes:

- YAML metadata: `base_model` (a Hub id; the embedded model is HuggingFaceTB/SmolLM2-135M-Instruct;
  a local folder has none), `license` (the base model's when known, else `unknown`), `datasets`
  (the Hub datasets the tasks were trained on), `tags` (always `t2t-mtl`), `library_name` (`peft`
  for an adapter-only bundle, else `transformers`) and `pipeline_tag`;
- the per-task metrics of the run's evaluation (`RUN/eval/<eval split>.json`, with 95 % intervals
  when present) and of the base model when `eval --base` was run;
- each task's template name and version, the prompt variant evaluated and its Jinja text;
- the prompt format and the exact text layout to prompt the model with (and how to build it with
  the tokenizer's chat template), with one concrete example;
- the training settings, and where each task's data came from with its licence note. A licence
  note is read from the README.md of the data's local folder (or the folder above it, as for the
  bundled samples in `data/`); a Hub dataset's licence is not recorded, so it says unknown.

`kind`: "adapter" (the run's `adapter/` folder as it is: LoRA weights on a base model) or "merged"
(a `t2t-mtl export` folder: a full model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from t2t_mtl import __version__
from t2t_mtl.core.config import EMBEDDED_MODEL
from t2t_mtl.core.errors import DataError, T2TError
from t2t_mtl.core.records import Record
from t2t_mtl.evaluation import metrics
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.runs.folder import MANIFEST, Run
from t2t_mtl.tasks import sources

__all__ = ["CARD_FILE", "KINDS", "card_metadata", "data_licence", "model_card", "write_model_card"]

CARD_FILE = "README.md"
KINDS = ("adapter", "merged")
# What we know of models we ship; any other base model's licence is unknown to us.
_KNOWN_BASES = {EMBEDDED_MODEL: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LICENCE_LINE = re.compile(r"licen[cs]e", re.IGNORECASE)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _base_model(name: str) -> tuple[str | None, str]:
    """(Hub id or None, licence) of the run's base model."""
    if name in _KNOWN_BASES:
        return _KNOWN_BASES[name]
    if _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name, "unknown"
    return None, "unknown"


def data_licence(path: Path | None) -> str:
    """The licence note of local data, from the README.md of the data's folder, else of the folder
    above it: the first paragraph naming a licence, up to its first sentence that says more than
    a heading ("Licence and origin." is followed by the sentence naming the licence); at most 400
    characters. "" when there is none."""
    if path is None:
        return ""
    folder = path if path.is_dir() else path.parent
    for cand in (folder / "README.md", folder.parent / "README.md"):
        if not cand.is_file():
            continue
        text = cand.read_text(encoding="utf-8", errors="replace")
        for para in re.split(r"\n\s*\n", text):
            if not _LICENCE_LINE.search(para):
                continue
            flat = " ".join(
                re.sub(r"\*\*|`|^[#>]+", "", para, flags=re.M).split()
            )  # markdown marks
            kept = []
            for sentence in re.split(r"(?<=[.!?])\s+", flat):
                kept.append(sentence)
                if _LICENCE_LINE.search(sentence) and len(sentence.split()) > 3:
                    break
            note = " ".join(kept)
            return note if len(note) <= 400 else note[:397] + "..."
    return ""


def _task_data(run: Run, name: str) -> dict[str, Any]:
    """Where task `name`'s training rows came from: {hub | path, licence}."""
    try:
        res = sources.resolve(run.template(name), run.source(name), "train")
    except (DataError, T2TError):
        return {"where": "unknown", "licence": "unknown"}
    if res.hub:
        rev = f" (revision {res.revision})" if res.revision else ""
        cfg = f", config {res.name}" if res.name else ""
        return {
            "hub": res.hub,
            "where": f"Hub dataset `{res.hub}`{cfg}{rev}, split `{res.split_name}`",
            "licence": f"unknown (not recorded; see https://huggingface.co/datasets/{res.hub})",
        }
    return {
        "where": f"local data `{res.path}`",
        "licence": data_licence(res.path) or "unknown (no licence note beside the data)",
    }


def _main_results(run: Run) -> tuple[dict, dict]:
    """(results of the tuned model, results of the base model) on the run's eval split ({} if none)."""
    split = run.cfg.eval.split
    return _read_json(run.eval_dir / f"{split}.json"), _read_json(
        run.eval_dir / f"{split}-base.json"
    )


def card_metadata(run: Run, manifest: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The card's YAML metadata (see the module docstring)."""
    base_id, licence = _base_model(run.cfg.model.name)
    hubs = []
    for name in run.task_names():
        hub = _task_data(run, name).get("hub")
        if hub and hub not in hubs:
            hubs.append(hub)
    adapter_only = kind == "adapter" and manifest.get("bundle", {}).get("kind", "adapter") != "full"
    method = (manifest.get("adapter") or {}).get("method", run.cfg.adapter.method)
    tags = ["t2t-mtl", "multi-task", "text-to-text"]
    tags += [method] if method in ("lora", "qlora") else []
    tags += sorted({t.get("task_type") for t in manifest.get("tasks", []) if t.get("task_type")})
    meta: dict[str, Any] = {}
    if base_id:
        meta["base_model"] = base_id
    meta["license"] = licence
    if hubs:
        meta["datasets"] = hubs
    meta["tags"] = tags
    meta["library_name"] = "peft" if adapter_only else "transformers"
    meta["pipeline_tag"] = (
        "text2text-generation" if manifest.get("family") == "seq2seq" else "text-generation"
    )
    return meta


def _fmt_score(e: Mapping[str, Any]) -> str:
    lo, hi = e.get("ci_low"), e.get("ci_high")
    return f"{e['primary']:.2f}" + (
        f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    )


def _results_section(run: Run) -> list[str]:
    res, base = _main_results(run)
    if not res.get("tasks"):
        return [
            "Not evaluated yet: run `t2t-mtl eval --run RUN` (and `--base` for the untuned model), "
            "then write this card again.",
        ]
    lim = res.get("limit")
    lines = [
        f"Split `{res.get('split')}`"
        + (f", at most {lim} rows per task" if lim else "")
        + "; greedy decoding, the answer parsed by the task's parser (unparsed = wrong). "
        "Scores are 0-100 with a 95 % bootstrap interval where computed.",
        "",
        "| task | metric | n | score [95 % CI] | base model | all metrics | invalid % |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name, e in res["tasks"].items():
        if "primary" not in e:
            lines.append(f"| {name} | — | 0 | — | — | {e.get('error', 'no examples')} | — |")
            continue
        b = (base.get("tasks") or {}).get(name, {})
        bscore = f"{b['primary']:.2f}" if "primary" in b else "—"
        others = ", ".join(f"{k} {v:.1f}" for k, v in (e.get("metrics") or {}).items())
        lines.append(
            f"| {name} | {metrics.MAIN_KEY.get(e['primary_metric'], e['primary_metric'])} | {e['n']} "
            f"| {_fmt_score(e)} | {bscore} | {others} "
            f"| {e.get('invalid_rate', 0.0):.1f} |"
        )
    comb, bcomb = res.get("combined"), base.get("combined")
    if comb is not None:
        bcomb_text = f"{bcomb:.2f}" if bcomb is not None else "—"
        lines.append(f"| **combined** | mean primary | | {comb:.2f} | {bcomb_text} | | |")
    return lines


def _layout(fmt: PromptFormat) -> str:
    return fmt.prompt(Record("", "{instruction}", "{input}", ""))


def _prompt_section(run: Run, fmt: PromptFormat, tasks: list[Mapping[str, Any]]) -> list[str]:
    lines = [
        f"Prompt format `{fmt.kind}` (layout version {fmt.version}). The model was trained on "
        "exactly this text (special tokens included) and answers after it; "
        "`{instruction}` and `{input}` are the task's rendered instruction and input:",
        "",
        "```text",
        _layout(fmt),
        "```",
        "",
    ]
    if fmt.kind == "chat":
        lines += [
            'It is one user message, `instruction + "\\n\\n" + input` (just the instruction when '
            "the input is empty), put through the tokenizer's chat template with the generation "
            "prompt, so with transformers:",
            "",
            "```python",
            'messages = [{"role": "user", "content": instruction + "\\n\\n" + input}]',
            "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            "ids = tokenizer(prompt, add_special_tokens=False).input_ids  # the template holds them",
            "```",
            "",
        ]
    if fmt.kind != "seq2seq" and fmt.answer_suffix:
        lines += [
            f"The answer ends with `{fmt.answer_suffix}`: stop generating there. Greedy decoding "
            "is what the metrics below used.",
            "",
        ]
    if fmt.truncation:
        lines += [
            f"Inputs longer than the training budget ({run.cfg.model.max_length} tokens for the "
            f"whole prompt) were shortened in the {fmt.truncation} of the input field.",
            "",
        ]
    lines += [
        "Task prompts are rendered from the task templates saved with the run (`templates/`); "
        "`t2t-mtl prompt`, `predict` and `render --format text|messages` build them for you "
        "(`render` writes them as JSON lines for a server such as vLLM, TGI or llama.cpp). "
        "Below, the Jinja text of each task's first training variant (`⏎` = line break); the "
        "answer choices and parsing rules are in the template files.",
        "",
        "| task | template (version) | type | variant | instruction | input | answer |",
        "|---|---|---|---|---|---|---|",
    ]
    example = None
    for t in tasks:
        name = t.get("name")
        try:
            tpl = run.template(name)
            v = tpl.train_variants()[0]
        except T2TError:
            lines.append(f"| {name} | {t.get('template')} ({t.get('version')}) | | | | | |")
            continue

        def cell(text: str | None) -> str:
            text = (text or "").replace("|", "\\|").replace("\n", "⏎")
            return f"`{text}`" if text else ""

        lines.append(
            f"| {name} | {tpl.name} ({tpl.version}) | {tpl.task_type} | {v.id} | "
            f"{cell(v.instruction)} | {cell(v.input)} | {cell(v.output)} |"
        )
        if example is None and tpl.samples is not None:
            try:
                rows = sources.load_rows(tpl, None, "validation", limit=1)
                if len(rows):
                    rec = sources.render_row(tpl, rows, 0, v.id, row_id="0", split="validation")
                    example = (name, rec)
            except T2TError:
                pass
    if example is not None:
        name, rec = example
        lines += [
            "",
            f"For example, a `{name}` row of the bundled validation samples is prompted as",
            "",
            "```text",
            fmt.prompt(rec),
            "```",
            "",
            f"and the expected answer is `{rec.output}`.",
        ]
    return lines


def _training_section(run: Run, manifest: Mapping[str, Any]) -> list[str]:
    cfg, tr, ad = run.cfg, run.cfg.train, run.cfg.adapter
    summ = _read_json(run.dir / "train_summary.json")
    adapter = (
        f"{ad.method}, r={ad.r}, alpha={ad.alpha}, dropout={ad.dropout}, target modules "
        f"{ad.target_modules}" + (f", {ad.quant_type} 4-bit base" if ad.method == "qlora" else "")
        if ad.method != "full"
        else "full fine-tuning"
    )
    stages = "; ".join(
        f"{s.name}: {s.steps} steps on {', '.join(s.tasks)}" for s in cfg.stage_list()
    )
    lines = [
        "| setting | value |",
        "|---|---|",
        f"| base model | `{cfg.model.name}` |",
        f"| adapter | {adapter} |",
        f"| stages | {stages} |",
        f"| optimiser | AdamW, lr {tr.learning_rate:g} ({tr.scheduler}, {tr.warmup_steps} warm-up steps), "
        f"weight decay {tr.weight_decay:g}, max grad norm {tr.max_grad_norm:g} |",
        f"| batch | {tr.batch_size} x {tr.grad_accum} accumulation per process |",
        f"| mixing | temperature {cfg.mixing.temperature:g}, cap {cfg.mixing.cap}, unit {cfg.mixing.unit} |",
        f"| replay | {'on' if cfg.replay.enabled else 'off'} |",
        f"| loss balancing | {tr.loss_balancing} |",
        f"| max length | {cfg.model.max_length} tokens (answers {cfg.model.max_target_length}) |",
        f"| seed | {cfg.seed} |",
    ]
    if summ:
        lines.append(
            f"| trained | {summ.get('steps')} steps, {summ.get('seconds')} s on "
            f"{summ.get('processes', 1)} process(es); final loss {summ.get('final_loss', 0.0):.4f} |"
        )
    lines.append(
        f"| tool | t2t-mtl {__version__} (run `{run.name}`, step {manifest.get('step')}) |"
    )
    return lines


def model_card(run_dir: str | Path, *, kind: str = "adapter") -> str:
    """The model card text of a run's final model (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    run = Run.load(run_dir)
    manifest = _read_json(run.bundle_dir() / MANIFEST)
    fmt = PromptFormat.from_dict(manifest["prompt_format"])
    tasks = manifest.get("tasks") or [{"name": n} for n in run.task_names()]
    meta = card_metadata(run, manifest, kind)
    base = meta.get("base_model") or f"the local model `{run.cfg.model.name}`"
    what = "A LoRA adapter" if meta["library_name"] == "peft" else "A full model (adapter merged)"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {run.name}",
        "",
        f"{what} fine-tuned from {base} on {len(tasks)} task(s) at once "
        f"({', '.join(t['name'] for t in tasks)}) with t2t-mtl "
        "(instruction-format multi-task fine-tuning: task templates, temperature-mixed stream, "
        "per-task evaluation).",
        "",
        "## Results",
        "",
        *_results_section(run),
        "",
        "## How to prompt it",
        "",
        *_prompt_section(run, fmt, tasks),
        "",
    ]
    if meta["library_name"] == "peft":
        lines += [
            "Load it on its base model with peft:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "model = AutoPeftModelForCausalLM.from_pretrained(THIS_REPO_OR_FOLDER)",
            "```",
            "",
        ]
    lines += [
        "## Training",
        "",
        *_training_section(run, manifest),
        "",
        "## Data and licences",
        "",
        "| task | data | licence |",
        "|---|---|---|",
    ]
    for name in run.task_names():
        d = _task_data(run, name)
        lines.append(f"| {name} | {d['where']} | {d['licence'].replace('|', '/')} |")
    lines += [
        "",
        f"Model licence: {meta['license']} (the base model's"
        + (")." if meta["license"] != "unknown" else "; check its own card).")
        + " Data licences may restrict how this model may be used: several research datasets "
        "allow non-commercial use only.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, folder: str | Path, *, kind: str) -> Path:
    """Write the card as `folder/README.md` (replacing peft's placeholder card); returns its path."""
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(run_dir, kind=kind), encoding="utf-8")
    return path
