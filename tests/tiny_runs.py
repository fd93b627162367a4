"""A tiny trained run for the evaluation and inference tests (built once per root, like tiny_models).

`tiny_staged_run(root, model_dir) -> Path`: two stages of two optimiser steps each on the shipped
templates' bundled samples (stage `first`: sentiment_sst2; stage `second`: ner_conll2003 + qa_squad),
LoRA on the tiny causal model with a high learning rate so the adapter visibly changes the model;
the evaluation hook runs every 2 steps (2 rows per task).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

TASKS = ["sentiment_sst2", "ner_conll2003", "qa_squad"]


def run_config(model_dir: Path, out_dir: Path) -> dict:
    """The run config (as a dict) of the tiny staged run."""
    return {
        "run_name": "tiny-staged",
        "output_dir": str(out_dir),
        "seed": 1,
        "model": {"name": str(model_dir), "max_length": 512},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "tasks": [{"template": t} for t in TASKS],
        "stages": [
            {"name": "first", "tasks": ["sentiment_sst2"], "steps": 2},
            {"name": "second", "tasks": ["ner_conll2003", "qa_squad"], "steps": 2},
        ],
        "train": {
            "batch_size": 2,
            "learning_rate": 0.02,
            "warmup_steps": 0,
            "save_steps": 100,
            "report_to": "none",
            "logging_steps": 1,
        },
        "eval": {"limit": 2, "max_new_tokens": 6, "batch_size": 4, "every_steps": 2},
    }


def tiny_staged_run(root: str | os.PathLike, model_dir: Path) -> Path:
    """Train the tiny staged run into `root/tiny-staged` once; returns the run folder."""
    from t2t_mtl.core.config import load_config
    from t2t_mtl.evaluation.evaluator import training_eval_fn
    from t2t_mtl.training.trainer import train

    target = Path(root) / "tiny-staged"
    if (target / "adapter" / "t2t_manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-staged.", dir=target.parent))
    try:
        cfg_file = tmp / "run.yaml"
        run_dir = tmp / "run"
        cfg_file.write_text(yaml.safe_dump(run_config(model_dir, run_dir)), encoding="utf-8")
        cfg = load_config(cfg_file)
        train(cfg, eval_fn=training_eval_fn(cfg))  # evaluates every 2 steps, as a real run would
        # The saved config names its own output_dir; move the whole run and point it at the new place.
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        saved["output_dir"] = str(target)
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump(saved, sort_keys=False), encoding="utf-8"
        )
        os.replace(run_dir, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def training_prompt_ids(pred, tpl, rows) -> list[list[int]]:
    """The prompt token ids the training collator builds for `rows` (first training variant, the
    run's prompt format and lengths): encode with the answer, collate, keep the unmasked positions
    whose label is -100. Every row must fit max_length untruncated, since training's prompt budget
    also keeps room for the answer and an inference prompt has no answer to make room for."""
    from t2t_mtl.model import features

    vid = tpl.train_variants()[0].id
    mc = pred.run.cfg.model
    feats = [
        features.encode(
            tpl.render(rows[i], vid, row_id=str(i), split="train"),
            pred.tokenizer,
            pred.fmt,
            mc.max_length,
            mc.max_target_length,
        )
        for i in range(len(rows))
    ]
    assert not any(f["truncated"] for f in feats)
    batch = features.CausalCollator(pred.tokenizer.pad_token_id)(feats)
    return [
        batch["input_ids"][r][
            (batch["labels"][r] == -100) & (batch["attention_mask"][r] == 1)
        ].tolist()
        for r in range(len(rows))
    ]
