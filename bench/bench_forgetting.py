"""Forgetting in two-stage training, with and without replay, EWC or freezing (issue 6, benchmark 2).

    .venv/bin/python bench/bench_forgetting.py [DATA_DIR] [--replay 0,0.1,0.3]
        [--settings none,replay,replay_balanced,ewc,replay_ewc,freeze] [--seeds 1,2,3]
        [--share 0.1] [--ewc-lambda 1000] [--ewc-samples 100] [--freeze-layers=-15,-1]
        [--stage-steps 100] [--batch-size 8] [--per-task 200] [--stage2-lr LR] [--limit 300]
        [--work runs/bench_forgetting] [--out bench/results/forgetting.json] [--doc docs/benchmarks.md]
        [--no-doc]

Stage 1 trains SST-2, SICK and SQuAD; stage 2 trains CoNLL-2003 and SciTLDR (the slices in DATA_DIR,
default ../shared/data/real), each stage --stage-steps optimiser steps × --batch-size, with the default
recipe (launch/configs/default.yaml). One run per replay share: 0 = no replay; s > 0 = a reservoir
buffer of --per-task stage-1 records per task that makes up the share s of stage 2's examples (the
budget stays the same, so replay displaces new-task examples). `--settings` adds named settings
(`NAMED`): `none`; `replay` / `replay_balanced` (a buffer making up --share of stage 2; balanced: one
reservoir per label for label tasks); `ewc` (stage 2 sets `ewc: {lambda: --ewc-lambda, samples:
--ewc-samples}`); `replay_ewc` (both; at a lambda other than 1000 both are keyed `ewc_lam<lambda>`, so a sweep keeps
every lambda's results); `freeze` (stage 2 trains only blocks --freeze-layers,
`stages[1].train_layers`). `--seeds` runs every setting once per seed (run seed = the seed; results
keyed `<setting>_s<seed>`, and the doc gets a mean-over-seeds table); without it the recipe's seed
runs once, keyed as before. Every stage's adapter is scored on all
five tasks (first --limit validation rows, primary metric) by `t2t-mtl eval --forgetting`'s code, giving
the forgetting matrix, average forgetting (mean over stage-1 tasks of best earlier score − final score)
and backward transfer (final − just-learned). Each report keeps the per-example statistics of every
stage's evaluation (`rows`), so settings run with --seeds get 95 % intervals bootstrapped over examples
and seeds (`forgetting_stats`) and the new tasks' scores as a percentage of the "none" setting's on
the same seeds. Every setting trains stage 1 alike, so a seed's
stage 1 is trained once: later settings of the seed start from the first one's checkpoint at the end
of stage 1 (`borrow_stage1`, exact: tested) and reuse its stage-1 evaluation. Run folders and
evaluations are cached under --work, so
an interrupted invocation continues; a setting whose report is already in --out with the same settings
is not run again, so a study continues on a machine that lost --work. Writes --out and the "Forgetting" section of --doc (heatmaps in
docs/img/).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

STAGE1 = ["sentiment_sst2", "nli_3way", "qa_squad"]
STAGE2 = ["ner_conll2003", "summarization"]
SECTION = "## Forgetting"
TARGET = 2.0  # average forgetting on stage-1 tasks with replay: at most 2 points (scores are 0–100)
EWC_LAMBDA = (
    1000.0  # --ewc-lambda's default; EWC settings run at another lambda get '_lam<lambda>' keys
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Named settings (--settings): what stage 2 adds against forgetting, and the doc's label.
NAMED = {
    "none": "none",
    "replay": "replay",
    "replay_balanced": "label-balanced replay",
    "ewc": "EWC",
    "replay_ewc": "replay + EWC",
    "freeze": "frozen lower blocks",
}


def setting_key(
    share: float,
    stage2_lr: float | None,
    setting: str | None = None,
    seed: int | None = None,
    ewc_lambda: float = EWC_LAMBDA,
) -> str:
    """Results key (and run-folder suffix) of one setting: '10', or '10_lr0.0001' with a stage-2 LR,
    or a named setting ('ewc', 'replay_ewc_lr0.0001'; an EWC setting at a lambda other than
    EWC_LAMBDA: 'ewc_lam10000'); '_s<seed>' is added with --seeds."""
    base = setting if setting is not None else f"{round(100 * share)}"
    if setting in ("ewc", "replay_ewc") and ewc_lambda != EWC_LAMBDA:
        base += f"_lam{ewc_lambda:g}"
    return (
        base
        + (f"_lr{stage2_lr:g}" if stage2_lr else "")
        + (f"_s{seed}" if seed is not None else "")
    )


def split_key(key: str) -> tuple[str, str, str]:
    """(setting or share, stage-2 LR or '', seed or '') of a results key."""
    rest, _, seed = key.rpartition("_s") if re.search(r"_s\d+$", key) else (key, "", "")
    base, _, lr = rest.partition("_lr")
    return base, lr, seed


def setting_label(key: str) -> str:
    """'10' -> '10 %'; '10_lr0.0001' -> '10 %, stage-2 LR 0.0001'; 'replay_ewc_s2' -> 'replay + EWC,
    seed 2'; 'ewc_lam10000' -> 'EWC (lambda 10000)'."""
    base, lr, seed = split_key(key)
    name, _, lam = base.partition("_lam")
    if not lam and name in ("ewc", "replay_ewc"):
        lam = f"{EWC_LAMBDA:g}"
    label = NAMED.get(name, f"{name} %") + (f" (lambda {lam})" if lam else "")
    return label + (f", stage-2 LR {lr}" if lr else "") + (f", seed {seed}" if seed else "")


def heading(key: str) -> str:
    """'Replay 10 %' for a replay share, 'Setting: EWC, seed 1' for a named setting."""
    share = split_key(key)[0].isdigit()
    return ("Replay " if share else "Setting: ") + setting_label(key)


def run_config(args, data: Path, share: float, setting: str | None = None, seed: int | None = None):
    """The two-stage run of one replay share (`setting` None) or one named setting, at `seed` (None:
    the recipe's)."""
    from t2t_mtl.core.config import load_config

    d = common.default_recipe()
    key = setting_key(share, args.stage2_lr, setting, seed, args.ewc_lambda)
    name = f"replay_{key}" if setting is None else key
    if setting is not None:
        share = args.share if "replay" in setting else 0.0
    if seed is not None:
        d["seed"] = seed
    d.update(run_name=name, output_dir=str(Path(args.work) / name), tasks=common.slice_tasks(data))
    d["model"]["truncation"] = (
        "end"  # what the measured runs used (layout 1); keeps every share comparable
    )
    d["stages"] = [
        {"name": "stage1", "tasks": STAGE1, "steps": args.stage_steps},
        {"name": "stage2", "tasks": STAGE2, "steps": args.stage_steps},
    ]
    if args.stage2_lr:
        d["stages"][1]["learning_rate"] = args.stage2_lr
    d["replay"] = {
        "enabled": share > 0,
        "per_task": args.per_task,
        "share": share if share > 0 else 0.1,
        "label_balanced": setting == "replay_balanced",
    }
    if setting in ("ewc", "replay_ewc"):
        d["stages"][1]["ewc"] = {"lambda": args.ewc_lambda, "samples": args.ewc_samples}
    if setting == "freeze":
        d["stages"][1]["train_layers"] = list(args.freeze_layers)
    d["train"].update(
        batch_size=args.batch_size,
        save_steps=50,
        # Keeps the end of stage 1 (step --stage-steps) for the same seed's other settings to start
        # from (`borrow_stage1`); checkpoints of the adapter are a few MB.
        save_total_limit=2 * args.stage_steps // 50 + 1,
        resume="auto",
        bad_rows="skip",
    )
    d["eval"].update(every_steps=0, limit=args.limit, split="validation")
    return load_config(data=d)


def one_setting(
    args, data: Path, share: float, setting: str | None = None, seed: int | None = None
) -> dict:
    """Train (once) and score every stage of one setting; returns the forgetting report."""
    from t2t_mtl.evaluation.run_eval import forgetting_run
    from t2t_mtl.training import trainer

    cfg = run_config(args, data, share, setting, seed)
    run_dir = Path(cfg.output_dir)
    if not (run_dir / "train_summary.json").is_file():
        src = borrow_stage1(run_dir, seed, args.stage_steps)
        log(
            f"training {cfg.run_name} (2 stages x {args.stage_steps} steps x {args.batch_size})"
            + (f"; stage 1 from {src}" if src else "")
        )
        trainer.train(cfg, eval_fn=None)
    rep_path = run_dir / "eval" / f"forgetting-{args.limit}.json"
    if rep_path.is_file():
        return attach_rows(json.loads(rep_path.read_text(encoding="utf-8")))
    borrow_stage_results(run_dir, seed)
    log(f"scoring every stage of {cfg.run_name}")
    rep, path = forgetting_run(
        run_dir, split="validation", limit=args.limit, progress=False, learned_only=True
    )
    for ext in (
        ".json",
        ".md",
        ".png",
    ):  # keep this limit's report apart from other `eval --forgetting` calls
        shutil.copyfile(path.with_suffix(ext), rep_path.with_suffix(ext))
    summary = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))
    borrowed = (run_dir / BORROWED).is_file()
    rep["train_seconds"] = None if borrowed else summary.get("seconds")
    rep["stage1_borrowed"] = borrowed
    rep["stage2_step_seconds"] = stage2_step_seconds(run_dir, args.stage_steps)
    attach_rows(rep)
    common.write_json(rep_path, rep)
    return rep


BORROWED = "stage1_borrowed.txt"  # in a run folder that started from another's stage-1 checkpoint


def borrow_stage1(run_dir: Path, seed: int | None, steps: int) -> Path | None:
    """Start a new run of a seed from the same seed's other setting's checkpoint at the end of
    stage 1 (step `steps`): every setting trains stage 1 alike (what it adds acts from stage 2
    on: the replay buffer is filled, the Fisher estimated after the stage, from the stage's
    records, on resume as in an uninterrupted run; exact resume is tested), so the study trains each
    seed's stage 1 once. Copies the checkpoint, the run id it carries (the runs are this study's
    own) and the metrics up to it; returns the source run folder, or None (nothing to borrow, or
    `run_dir` already has a checkpoint)."""
    from t2t_mtl.training import checkpointing

    if seed is None or checkpointing.list_checkpoints(run_dir):
        return None
    for other in sorted(run_dir.parent.glob(f"*_s{seed}")):
        ckpt = other / "checkpoints" / f"step-{steps}"
        if other == run_dir or not (ckpt / checkpointing.STATE_FILE).is_file():
            continue
        state = checkpointing.read_state(ckpt)
        if state.get("stage_index") != 0 or state.get("stage_step") != steps:
            continue
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(ckpt, run_dir / "checkpoints" / ckpt.name)
        for name in (checkpointing.RUN_ID_FILE, "metrics.jsonl"):
            if (other / name).is_file():
                shutil.copyfile(other / name, run_dir / name)
        (run_dir / BORROWED).write_text(f"{other}\n", encoding="utf-8")
        return other
    return None


def stage2_step_seconds(run_dir: Path, steps: int) -> float | None:
    """Seconds per optimiser step of the last stage, from the metrics log: between its first and
    last logged rows (steps after `steps`, the end of stage 1), so a run that started from a
    borrowed stage 1 is timed like one that trained it; None with fewer than two such rows."""
    times = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "time" in row and int(row.get("step", 0)) > steps:
            times[int(row["step"])] = float(row["time"])
    if len(times) < 2:
        return None
    first, last = min(times), max(times)
    return round((times[last] - times[first]) / (last - first), 3)


def borrow_stage_results(run_dir: Path, seed: int | None) -> None:
    """Copy, into `run_dir/eval`, the stage results of the same seed's other settings that it
    lacks: every setting trains stage 1 alike, and `forgetting_run` reads a copied stage back only
    when its fingerprint (weights, tasks, rows, settings) matches this run's bundle, else evaluates
    it anew. Saves each setting after the first its stage-1 evaluation."""
    if seed is None:
        return
    for other in sorted(run_dir.parent.glob(f"*_s{seed}")):
        if other == run_dir:
            continue
        for src in (other / "eval").glob("stage-*-validation.json"):
            dst = run_dir / "eval" / src.name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)


def relevant_settings(settings: dict, key: str) -> dict:
    """The part of the benchmark's settings that shapes the run of results key `key`: a report
    measured under other values of the rest (another EWC lambda for a replay run, say) still
    stands."""
    base = split_key(key)[0].partition("_lam")[0]
    drop = set()
    if "replay" not in base:
        drop.add("share")
    if "ewc" not in base:
        drop |= {"ewc_lambda", "ewc_samples"}
    if base != "freeze":
        drop.add("freeze_layers")
    return {k: v for k, v in settings.items() if k not in drop}


def attach_step_time(rep: dict, steps: int) -> None:
    """Add `stage2_step_seconds` to a report written before it was kept, while its run folder is
    here."""
    if rep.get("stage2_step_seconds") is None and rep.get("run"):
        rep["stage2_step_seconds"] = stage2_step_seconds(Path(rep["run"]), steps)


def attach_rows(rep: dict) -> dict:
    """Add `rows`: {stage: {task: per-example statistics}} from the run folder's stage results (what
    the intervals resample), unless present or the folder is gone; returns `rep`."""
    if rep.get("rows") or not rep.get("run"):
        return rep
    rows = {}
    for stage in rep["stages"]:
        path = Path(rep["run"]) / "eval" / f"stage-{stage}-{rep.get('split', 'validation')}.json"
        if not path.is_file():
            return rep
        res = json.loads(path.read_text(encoding="utf-8"))
        rows[stage] = {t: e["per_example"] for t, e in res["tasks"].items() if "per_example" in e}
    rep["rows"] = rows
    return rep


def forgetting_stats(reports: dict, resamples: int | None = None) -> dict:
    """Per setting with seeds (keys '<setting>_s<seed>' whose reports hold `rows`): the mean over
    seeds and a 95 % interval, bootstrapped over examples and seeds as in the quality study
    (quality_stats.py: per task, every run is resampled on the same row draws; per setting, its
    seeds are drawn with replacement), of average forgetting, losses only, BWT, the final mean and
    each last-stage task's final score; and, against the "none" setting run with the same seeds,
    each last-stage task's final score as a percentage of none's (paired by seed)."""
    import numpy as np

    from t2t_mtl.evaluation import confidence

    resamples = resamples or confidence.RESAMPLES
    groups: dict[str, dict[str, dict]] = {}
    for key, rep in reports.items():
        base, lr, seed = split_key(key)
        if seed and rep.get("rows"):
            groups.setdefault(base + (f"_lr{lr}" if lr else ""), {})[seed] = rep
    if not groups:
        return {}
    first = next(iter(next(iter(groups.values())).values()))
    stages, tasks = first["stages"], first["tasks"]
    last = len(stages) - 1
    learned = {t: stages.index(s) for t, s in first["learned_at"].items()}
    old = [t for t in tasks if learned.get(t, last) < last]
    new = [t for t in tasks if learned.get(t) == last]
    owners = [(g, seed) for g, by in groups.items() for seed in sorted(by, key=int)]
    # Per task, the stages from the one that trained it on (what forgetting and BWT read; the
    # cells before it may be empty: `forgetting_run(learned_only=True)`).
    boot: dict[str, np.ndarray] = {}  # task -> (runs, its stages, resamples)
    point: dict[str, np.ndarray] = {}  # task -> (runs, its stages)
    for t in tasks:
        own = stages[learned.get(t, last) :]
        flat = [
            confidence.RowStats.from_json(groups[g][seed]["rows"][st][t])
            for g, seed in owners
            for st in own
        ]
        b = confidence.bootstrap(flat, resamples=resamples, seed=confidence.task_seed(0, t))
        boot[t] = b.reshape(len(owners), len(own), resamples)
        point[t] = np.array([x.point() for x in flat]).reshape(len(owners), len(own))

    def measures(score):  # score[t]: (runs, its stages, ...) -> name -> (runs, ...)
        fin = {t: score[t][:, -1] for t in tasks}
        forg = {t: score[t][:, :-1].max(axis=1) - fin[t] for t in old}
        out = {
            "avg_forgetting": np.mean([forg[t] for t in old], axis=0),
            "losses_only": np.mean([np.maximum(forg[t], 0.0) for t in old], axis=0),
            "bwt": np.mean([fin[t] - score[t][:, 0] for t in old], axis=0),
            "final_mean": np.mean([fin[t] for t in tasks], axis=0),
        }
        out.update({f"final:{t}": fin[t] for t in new})
        return out

    m_boot, m_point = measures(boot), measures(point)
    rng = np.random.default_rng(confidence.SEED)
    res: dict = {}
    draws: dict[str, dict[str, np.ndarray]] = {}
    for g in groups:
        runs = np.array([i for i, (o, _) in enumerate(owners) if o == g])
        pick = runs[rng.integers(0, len(runs), size=(resamples, len(runs)))]
        draws[g] = {
            k: v[pick, np.arange(resamples)[:, None]].mean(axis=1) for k, v in m_boot.items()
        }
        res[g] = {"seeds": len(runs)}
        for k, v in m_point.items():
            lo, hi = confidence.interval(draws[g][k])
            res[g][k] = {"mean": float(v[runs].mean()), "low": lo, "high": hi}
    if "none" in groups:
        # Paired by seed: a setting against the unprotected runs of *its own* seeds (the same
        # stage-1 model and stage-2 order), both resampled on the same seed draws.
        pair_rng = np.random.default_rng(confidence.SEED + 1)
        at = {(o, seed): i for i, (o, seed) in enumerate(owners)}
        for g in groups:
            common = [seed for seed in sorted(groups[g], key=int) if seed in groups["none"]]
            if not common:
                continue
            mine = np.array([at[(g, seed)] for seed in common])
            base = np.array([at[("none", seed)] for seed in common])
            pick = pair_rng.integers(0, len(common), size=(resamples, len(common)))
            cols = np.arange(resamples)[:, None]
            for t in new:
                k = f"final:{t}"
                gv = m_boot[k][mine[pick], cols].mean(axis=1)
                nv = m_boot[k][base[pick], cols].mean(axis=1)
                lo, hi = confidence.interval(100.0 * gv / np.maximum(nv, 1e-9))
                mean = 100.0 * m_point[k][mine].mean() / max(m_point[k][base].mean(), 1e-9)
                res[g][f"vs_none:{t}"] = {"mean": mean, "low": lo, "high": hi, "seeds": len(common)}
    return {"resamples": resamples, "old_tasks": old, "new_tasks": new, "settings": res}


def losses_only(rep: dict) -> float | None:
    """Average forgetting with gains counted as 0: mean of max(0, forgetting) over stage-1 tasks."""
    vals = [max(0.0, v) for v in (rep.get("forgetting") or {}).values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def section(results: dict, doc: Path) -> str:
    """The doc section: per-setting matrix, average forgetting, BWT, target check, heatmaps."""
    from report_quality import LABEL

    st, m = results["settings"], results.get("machine", {})
    out = [
        "Command: `python bench/bench_forgetting.py ../shared/data/real` (resumable; run folders under "
        "`runs/bench_forgetting/`). Results: `bench/results/forgetting.json`.",
        common.machine_line(m),
        f"Stage 1: SST-2, SICK, SQuAD; stage 2: CoNLL-2003, SciTLDR; {st['stage_steps']} steps × "
        f"{st['batch_size']} examples per stage, default recipe (embedded SmolLM2-135M-Instruct, LoRA r16). "
        f"Replay: a reservoir of {st['per_task']} stage-1 records per task makes up the given share of "
        "stage 2's examples (same budget). Scores: primary metric on the first validation rows of "
        "each task (as many as the table says; the settings with seeds skip the tasks a stage has not "
        "trained yet, which forgetting and BWT never read), points. *Average forgetting* = mean over stage-1 tasks of (best "
        "score before the last stage − final score); *BWT* = mean of (final − score right after learning).",
        "*Losses only* counts a stage-1 task that improved during stage 2 as 0 instead of as negative "
        "forgetting, so one task's gain cannot hide another's loss.",
        "| setting (replay share or name) | rows per task | avg forgetting (stage-1 tasks) | losses only "
        "| BWT | final mean (5 tasks) "
        "| target ≤ 2 pts (avg / losses only) |\n|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, rep in results["settings_results"].items():
        f, lo = rep.get("average_forgetting"), losses_only(rep)

        def verdict(x):
            return "met" if x is not None and x <= TARGET else "**not met**"

        ok = "–" if split_key(key)[0] in ("0", "none") else f"{verdict(f)} / {verdict(lo)}"
        out[-1] += (
            f"\n| {setting_label(key)} | {rep.get('limit', '–')} | {common.fmt_score(f)} | "
            f"{common.fmt_score(lo)} | "
            f"{common.fmt_score(rep.get('backward_transfer'))} | "
            f"{common.fmt_score(rep.get('final_average'))} | {ok} |"
        )
    if st.get("ewc_lambda") is not None:
        out.insert(
            4,
            f"Named settings: *replay* makes up {st.get('share')} of stage 2; *EWC*: stage 2 sets "
            f"`ewc: {{lambda: {EWC_LAMBDA:g}, samples: {st.get('ewc_samples')}}}` (another lambda where "
            "the setting names one); *frozen lower "
            f"blocks*: stage 2 trains only blocks {st.get('freeze_layers')} (`train_layers`).",
        )
    seeds_table = ci_table(results["settings_results"]) or seed_means(results["settings_results"])
    if seeds_table:
        out.append(seeds_table)
    for key, rep in results["settings_results"].items():
        tasks = rep["tasks"]
        lines = [
            f"**{heading(key)}** — scores after each stage:",
            "",
            "| after | " + " | ".join(LABEL.get(t, t) for t in tasks) + " |",
            "|---|" + "---:|" * len(tasks),
        ]
        for s, row in zip(rep["stages"], rep["matrix"]):
            lines.append(f"| {s} | " + " | ".join(common.fmt_score(v) for v in row) + " |")
        per = ", ".join(
            f"{LABEL.get(t, t).split(' (')[0]} {v:+.1f}" for t, v in rep["forgetting"].items()
        )
        lines.append(f"\nForgetting per stage-1 task (points lost): {per}.")
        img = doc.parent / "img" / f"forgetting_replay_{key}.png"
        src = Path(rep.get("run", "")) / "eval" / f"forgetting-{st['limit']}.png"
        if src.is_file():
            img.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, img)
        if img.is_file():  # copied now, or on the machine that ran it (its run folder is gone)
            lines.append(f"\n![forgetting, {heading(key).lower()}](img/{img.name})")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def ci_table(reports: dict) -> str:
    """The settings with seeds: means over seeds with 95 % intervals (`forgetting_stats`), the new
    tasks against no protection, the target check and the training time against none; "" when no
    report has per-example rows."""
    from report_quality import LABEL

    st = forgetting_stats(reports)
    if not st:
        return ""
    res, new = st["settings"], st["new_tasks"]

    def ci(x: dict | None, unit: str = "") -> str:
        if not x:
            return "–"
        return f"{x['mean']:.1f}{unit} [{x['low']:.1f}, {x['high']:.1f}]"

    def short(t: str) -> str:
        return LABEL.get(t, t).split(" (")[0]

    times: dict[str, list[float]] = {}
    for key, rep in reports.items():
        base, lr, seed = split_key(key)
        none = reports.get(setting_key(0.0, float(lr) if lr else None, "none", int(seed or 0)))
        mine, ref = (r.get("stage2_step_seconds") if r else None for r in (rep, none))
        if seed and mine and ref:
            g = base + (f"_lr{lr}" if lr else "")
            times.setdefault(g, []).append(mine / ref)
    lines = [
        f"Means over seeds with 95 % intervals (bootstrap over the {st['resamples']} resamples of "
        "examples and seeds, as in the quality study), points; the new tasks' final scores as a "
        "percentage of the no-protection runs' of the same seeds (paired by seed):",
        "",
        "| setting | seeds | avg forgetting | losses only | BWT | final mean | "
        + " | ".join(f"{short(t)} vs none" for t in new)
        + " | target: losses only ≤ 2 (interval included), new tasks ≥ 95 % | stage-2 step time vs none |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(new) + "---|---:|",
    ]
    for g, r in res.items():
        keeps = all(r.get(f"vs_none:{t}", {}).get("mean", 0) >= 95 for t in new)
        if g.startswith("none"):
            verdict = "–"
        elif r["losses_only"]["high"] <= TARGET and keeps:
            verdict = "met"
        else:
            verdict = (
                "not met ("
                + ", ".join(
                    x
                    for x, bad in (
                        ("forgetting", r["losses_only"]["high"] > TARGET),
                        ("new tasks", not keeps),
                    )
                    if bad
                )
                + ")"
            )
        tm = times.get(g)
        lines.append(
            f"| {setting_label(g)} | {r['seeds']} | {ci(r['avg_forgetting'])} | "
            f"{ci(r['losses_only'])} | {ci(r['bwt'])} | {ci(r['final_mean'])} | "
            + " | ".join(ci(r.get(f"vs_none:{t}"), " %") for t in new)
            + f" | {verdict} | {f'{statistics.mean(tm):.2f}×' if tm else '–'} |"
        )
    lines.append(
        "\n*Stage-2 step time vs none*: seconds per step of stage 2 (from the metrics log) over the "
        "same seed's no-protection run's, on a machine shared with other work (noisy; '–' where the "
        "run folders that held the logs are gone); the controlled per-step cost of each method "
        'is in "Cost of protection against forgetting" below.'
    )
    return "\n".join(lines)


def seed_means(reports: dict) -> str:
    """Mean ± sd over seeds per setting (keys with '_s<seed>'), or "" when no key has a seed."""
    groups: dict[str, list[dict]] = {}
    for key, rep in reports.items():
        base, lr, seed = split_key(key)
        if seed:
            groups.setdefault(base + (f"_lr{lr}" if lr else ""), []).append(rep)
    if not groups:
        return ""

    def stat(vals: list) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.1f} ± {sd:.1f}"

    lines = [
        "Mean ± sd over seeds (points):",
        "",
        "| setting | seeds | avg forgetting | losses only | BWT | final mean |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, reps in groups.items():
        lines.append(
            f"| {setting_label(key)} | {len(reps)} | "
            f"{stat([r.get('average_forgetting') for r in reps])} | "
            f"{stat([losses_only(r) for r in reps])} | "
            f"{stat([r.get('backward_transfer') for r in reps])} | "
            f"{stat([r.get('final_average') for r in reps])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data_dir", nargs="?", default=str(common.DEFAULT_DATA))
    ap.add_argument(
        "--replay",
        default=None,
        help="comma-separated replay shares of stage 2 (0 = none); default 0,0.1,0.3 without "
        "--settings, none with it",
    )
    ap.add_argument(
        "--settings", default="", help=f"comma-separated named settings: {', '.join(NAMED)}"
    )
    ap.add_argument(
        "--seeds", default="", help="comma-separated run seeds (default: the recipe's, once)"
    )
    ap.add_argument("--share", type=float, default=0.1, help="replay share of the named settings")
    ap.add_argument(
        "--ewc-lambda",
        type=float,
        default=EWC_LAMBDA,
        help=f"lambda of the EWC settings; another than {EWC_LAMBDA:g} keys them 'ewc_lam<lambda>'",
    )
    ap.add_argument("--ewc-samples", type=int, default=100)
    ap.add_argument(
        "--freeze-layers",
        default="-15,-1",
        help="FIRST,LAST blocks stage 2 trains in the freeze setting (negative: from the top)",
    )
    ap.add_argument("--stage-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--per-task", type=int, default=200, help="replay buffer records per stage-1 task"
    )
    ap.add_argument(
        "--stage2-lr",
        type=float,
        default=None,
        help="peak learning rate of stage 2 (default: the recipe's train.learning_rate)",
    )
    ap.add_argument(
        "--limit", type=int, default=300, help="validation rows scored per task (issue 14: >= 300)"
    )
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_forgetting"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "forgetting.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument(
        "--doc-only", action="store_true", help="rewrite the doc section from --out; run nothing"
    )
    args = ap.parse_args(argv)
    if args.doc_only:
        results = json.loads(Path(args.out).read_text(encoding="utf-8"))
        for rep in results.get("settings_results", {}).values():
            attach_rows(rep)  # rows of reports written before they were kept
            attach_step_time(rep, results["settings"]["stage_steps"])
        common.write_json(Path(args.out), results)
        common.update_doc(Path(args.doc), SECTION, section(results, Path(args.doc)))
        log(f"updated {args.doc}")
        return 0
    data = Path(args.data_dir).resolve()
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    replay = args.replay if args.replay is not None else ("" if settings else "0,0.1,0.3")
    try:
        shares = [float(x) for x in replay.split(",") if x.strip()]
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or [None]
        args.freeze_layers = [int(x) for x in args.freeze_layers.split(",")]
    except ValueError:
        print(
            "error: --replay, --seeds and --freeze-layers take comma-separated numbers "
            "(e.g. --replay 0,0.1 --seeds 1,2,3 --freeze-layers=-15,-1)",
            file=sys.stderr,
        )
        return 2
    errors = common.check_data_dir(data, [f for _, f in common.SLICES])
    errors += [f"error: --replay {s}: a share must be in [0, 1)" for s in shares if not 0 <= s < 1]
    errors += [
        f"error: --settings: unknown setting {x!r} (choose from {', '.join(NAMED)})"
        for x in settings
        if x not in NAMED
    ]
    if not 0 < args.share < 1:
        errors.append("error: --share must be in (0, 1)")
    if len(args.freeze_layers) != 2:
        errors.append("error: --freeze-layers takes FIRST,LAST")
    if args.ewc_lambda <= 0 or args.ewc_samples <= 0:
        errors.append("error: --ewc-lambda and --ewc-samples must be > 0")
    if errors:
        return common.report_errors(errors)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text(encoding="utf-8")) if out_path.is_file() else {}
    results["settings"] = {
        "stage_steps": args.stage_steps,
        "batch_size": args.batch_size,
        "per_task": args.per_task,
        "limit": args.limit,
        "data": str(data),
    }
    if settings:
        results["settings"].update(
            share=args.share,
            ewc_lambda=args.ewc_lambda,
            ewc_samples=args.ewc_samples,
            freeze_layers=args.freeze_layers,
        )
    res = results.setdefault("settings_results", {})
    for rep in res.values():
        attach_rows(rep)  # rows of reports written before they were kept
        attach_step_time(rep, args.stage_steps)
    # Seed-major: after the first pass every setting has one seed, so a partial study is usable.
    runs = [(share, None) for share in shares] + [(0.0, name) for name in settings]
    for seed in seeds:
        for share, name in runs:
            key = setting_key(share, args.stage2_lr, name, seed, args.ewc_lambda)
            before = res.get(key, {}).get("bench_settings")
            if before and relevant_settings(before, key) == relevant_settings(
                results["settings"], key
            ):
                continue  # measured before with these settings (perhaps on another machine)
            res[key] = one_setting(args, data, share, name, seed)
            res[key]["bench_settings"] = dict(results["settings"])
            results["machine"] = common.machine(
                command="python bench/bench_forgetting.py " + " ".join(argv or sys.argv[1:])
            )
            common.write_json(out_path, results)
    if not args.no_doc:
        common.update_doc(Path(args.doc), SECTION, section(results, Path(args.doc)))
        log(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
