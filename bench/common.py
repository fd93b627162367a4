"""Helpers shared by the bench/ scripts: the real-data run config, machine facts, doc sections.

Not part of the package (nothing in t2t_mtl imports bench/). Each bench script puts the repository
root on sys.path and imports this module as `common`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "real"

# The five training slices of the issue-6 benchmarks: (task template, folder under the data dir).
SLICES = (
    ("sentiment_sst2", "sentiment_sst2"),
    ("nli_3way", "nli_sick"),
    ("qa_squad", "qa_squad"),
    ("ner_conll2003", "ner_conll2003"),
    ("summarization", "summarization_scitldr"),
)
# Left out of every training run, for zero-shot transfer: (template, folder, split overrides).
HELDOUT_SLICES = (
    ("nli_2way", "nli_rte", {}),
    # AG News has no official validation split in the slice; test.jsonl is disjoint from training.
    ("topic_ag_news", "topic_ag_news", {"validation": "test", "test": "test"}),
)


def check_data_dir(data: Path, folders: Sequence[str]) -> list[str]:
    """One error line per slice folder missing under `data` (empty when all are there)."""
    return [
        f"error: {data / f}: slice folder not found (pass the real-data folder as DATA_DIR)"
        for f in folders
        if not (data / f).is_dir()
    ]


def report_errors(errors: Sequence[str]) -> int:
    """Print the errors to stderr; the exit status for them (2 when there are any, else 0)."""
    for e in errors:
        print(e, file=sys.stderr)
    return 2 if errors else 0


def slice_tasks(
    data: Path, names: Sequence[str] | None = None, max_examples: dict[str, int] | None = None
) -> list[dict]:
    """Run-config `tasks:` entries for the five slices (optionally only `names`, optionally capped)."""
    out = []
    for tpl, folder in SLICES:
        if names is not None and tpl not in names:
            continue
        entry: dict[str, Any] = {"template": tpl, "source": {"path": str(data / folder)}}
        if max_examples and tpl in max_examples:
            entry["max_examples"] = int(max_examples[tpl])
        out.append(entry)
    return out


def heldout_tasks(data: Path) -> list[dict]:
    """`tasks:` entries for the transfer slices (RTE, AG News)."""
    out = []
    for tpl, folder, splits in HELDOUT_SLICES:
        src: dict[str, Any] = {"path": str(data / folder)}
        if splits:
            src["splits"] = dict(splits)
        out.append({"template": tpl, "source": src})
    return out


def default_recipe() -> dict:
    """launch/configs/default.yaml as a plain dict (the recipe every benchmark starts from)."""
    import yaml

    return yaml.safe_load(
        (ROOT / "launch" / "configs" / "default.yaml").read_text(encoding="utf-8")
    )


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra: Any) -> dict:
    """Date, CPU, core count, memory and library versions, for a results file."""
    import importlib.metadata as md

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "nproc": os.cpu_count(),
        "mem_gib": mem,
        "python": platform.python_version(),
        **{p: ver(p) for p in ("torch", "transformers", "peft", "trl", "accelerate", "datasets")},
    }
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    info.update(extra)
    return info


def machine_line(m: dict) -> str:
    """One markdown line describing the machine and versions of a results file, and the command
    line the results came from as it was typed (the section's "Command:" is the general form)."""
    dev = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    ran = f" Run as: `{m['command'].strip()}`." if m.get("command") else ""
    return (
        f"Machine: {m.get('cpu')}, {m.get('nproc')} cores, {m.get('mem_gib')} GiB{dev}; torch {m.get('torch')}, "
        f"transformers {m.get('transformers')}, peft {m.get('peft')}, trl {m.get('trl')}; measured {m.get('date')}."
        + ran
    )


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a killed benchmark never leaves half a results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def update_doc(doc: Path, section: str, body: str) -> None:
    """Replace (or append) one `## section` of `doc`, leaving the other sections alone."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n"
    start = text.find(section + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + len(section))
        text = text[:start] + block + (text[nxt:] if nxt >= 0 else "")
    doc.write_text(text, encoding="utf-8")


def fmt_score(x: Any, digits: int = 1) -> str:
    """A score in points (the evaluation's primary metrics are 0–100), e.g. 87.3; '–' when missing."""
    return "–" if x is None else f"{x:.{digits}f}"


# ------------------------------------------------------------------ the TRL baseline's recipe


def stream_examples(cfg, tok, fmt, n: int) -> list[dict]:
    """Our encoding of the first `n` records of the stage-0 stream (what our trainer trains on, in
    order): ids, labels, and the prompt / completion texts decoded from them (prompt = up to the first
    target token), so a TRL run can train on exactly our records."""
    from t2t_mtl.mixing import mixture
    from t2t_mtl.model import features

    members = mixture.build_members(cfg)
    index = {name: i for i, name in enumerate(cfg.task_names())}
    stream = mixture.plan_stage(cfg, 0, members).stream()
    out = []
    for rec in stream.take(n):
        f = features.encode(
            rec,
            tok,
            fmt,
            cfg.model.max_length,
            cfg.model.max_target_length,
            task_index=index[rec.task],
        )
        cut = sum(1 for x in f["labels"] if x == features.IGNORE_INDEX)
        ids = f["input_ids"]
        text = [
            tok.decode(part, clean_up_tokenization_spaces=False) for part in (ids[:cut], ids[cut:])
        ]
        out.append({"ids": ids, "labels": f["labels"], "prompt": text[0], "completion": text[1]})
    return out


def trl_configs(cfg, output_dir: str, max_steps: int, **overrides: Any):
    """(SFTConfig, LoraConfig) of a plain TRL SFTTrainer run with `cfg`'s recipe: batch size,
    accumulation, learning rate, warm-up, schedule, clipping, max length, checkpointing, LoRA
    settings and seed; completion-only loss, no packing, float32 unless `cfg` trains in bf16, no
    saving or reporting. `overrides` replace SFTConfig fields (packing, sampling order, logging)."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig

    from t2t_mtl.training import preflight

    tr, ad = cfg.train, cfg.adapter
    args: dict[str, Any] = {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": tr.batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "learning_rate": tr.learning_rate,
        "weight_decay": tr.weight_decay,
        "warmup_steps": tr.warmup_steps,
        "lr_scheduler_type": tr.scheduler,
        "max_grad_norm": tr.max_grad_norm,
        "max_length": cfg.model.max_length,
        "packing": False,
        "completion_only_loss": True,
        "bf16": preflight.mixed_precision(cfg) == "bf16",
        # transformers refuses bf16 without an accelerator unless told the run is on the CPU
        "use_cpu": not torch.cuda.is_available(),
        "fp16": False,
        "gradient_checkpointing": bool(tr.gradient_checkpointing),  # TRL: all blocks or none
        "logging_steps": tr.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": cfg.seed,
        "dataloader_num_workers": 0,
    }
    args.update(overrides)
    lora = LoraConfig(
        r=ad.r,
        lora_alpha=ad.alpha,
        lora_dropout=ad.dropout,
        target_modules=ad.target_modules,
        task_type="CAUSAL_LM",
    )
    return SFTConfig(**args), lora


@contextlib.contextmanager
def same_lora_init():
    """Inside: every LoRA model peft builds (ours through `peft.get_peft_model`, TRL's
    `SFTTrainer` through its own import of that name) starts from the first one's draw, so two
    trainers can be compared from one initialisation. Yields {parameter name: initial value},
    filled by the first model built; both names are restored on exit."""
    import peft
    import torch
    import trl.trainer.sft_trainer as sft  # imported first: its binding is still peft's own

    init: dict[str, torch.Tensor] = {}
    make, theirs = peft.get_peft_model, sft.get_peft_model

    def same_init(model, config, *args, **kwargs):
        m = make(model, config, *args, **kwargs)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.requires_grad:
                    p.copy_(init.setdefault(n, p.detach().clone()))
        return m

    peft.get_peft_model = sft.get_peft_model = same_init
    try:
        yield init
    finally:
        peft.get_peft_model, sft.get_peft_model = make, theirs
