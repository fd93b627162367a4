"""Three new tasks written from the README alone go through the whole journey.

The templates are the README's own YAML blocks ("Writing a task of your own"): a many-class
classification, a sentence-pair task (both including the shipped `_shared/label_task.yaml` from a
user folder) and an NER task with its own lower-case hyphenated entity types. On small JSONL files
written here they validate (trial renders on their samples), preview, mix, train 2 steps on the
tiny model, evaluate, and score 100 on the oracle check; their run folder is self-contained.
The README's other task shapes (multiple choice with per-row options, multi-label, translation,
regression) go through the same journey from their own YAML blocks.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from t2t_mtl.cli.main import main
from t2t_mtl.tasks import catalogue

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("intent", "paraphrase", "product_ner")


def readme_template(name: str) -> str:
    """The README's ```yaml block that defines task `name`."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Writing a task of your own") :]
    for block in re.findall(r"```yaml\n(.*?)```", section, re.S):
        if block.startswith(f"name: {name}\n"):
            return block
    raise AssertionError(f"no template for {name} in the README")


def _rows(name: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if name == "intent":
        choices = re.search(r"answer_choices: \[(.*)\]", readme_template("intent"))[1].split(", ")
        words = ["please", "my", "trip", "today", "I need", "help with", "the", "booking"]
        return [
            {
                "utterance": f"{' '.join(rng.sample(words, 3))} {c.replace('_', ' ')} {i}",
                "label": c,
            }
            for i, c in enumerate(rng.choice(choices) for _ in range(n))
        ]
    if name == "paraphrase":
        pairs = [
            ("A man plays a guitar.", "Someone is playing music.", "yes"),
            ("The cat sleeps on the mat.", "A dog runs in the park.", "no"),
            ("She bought a new car.", "A new car was bought by her.", "yes"),
            ("It is raining in Oslo.", "The sun shines in Rome.", "no"),
        ]
        return [
            {"sentence1": f"{a} ({i})", "sentence2": b, "label": y}
            for i, (a, b, y) in enumerate(rng.choice(pairs) for _ in range(n))
        ]
    people, products, units = ["Ana", "Li Wei", "Omar"], ["Pixel 7", "Kindle"], ["Acme Store"]
    out = []
    for _ in range(n):
        toks, tags = [], []
        for kind, names in (("person", people), ("product-name", products), ("org-unit", units)):
            if rng.random() < 0.7:
                words = rng.choice(names).split()
                toks += words + [rng.choice(["and", "with", "at"])]
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1) + ["O"]
        toks, tags = toks + ["today", "."], tags + ["O", "O"]
        out.append({"tokens": toks, "tags": tags})
    return out


@pytest.fixture
def user_tasks(tmp_path) -> Path:
    """my_tasks/<task>.yaml from the README, my_tasks/data/<task>/{train,validation}.jsonl."""
    folder = tmp_path / "my_tasks"
    for k, name in enumerate(TASKS):
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.yaml").write_text(readme_template(name), encoding="utf-8")
        for split, n in (("train", 24), ("validation", 8)):
            data = folder / "data" / name / f"{split}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            rows = _rows(name, n, seed=10 * k + (split == "train"))
            data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_readme_tasks_validate_preview_mix_train_eval_and_score_100(
    user_tasks, tmp_path, tiny_causal_dir, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(catalogue.ENV_VAR, str(user_tasks))  # the README's first way
    assert main(["validate", *TASKS]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "validate: 3 template(s) OK; rendered on bundled samples: " in err
    assert main(["validate", "--oracle", *TASKS]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    for name in TASKS:
        assert re.search(
            rf"oracle {name} \(train, validation\): \S+ \S* ?100\.00, invalid 0\.0 %", err
        )
    for name in TASKS:
        assert main(["preview", name, "-n", "3"]) == 0
        out, err = capsys.readouterr()
        recs = [json.loads(x) for x in out.splitlines()]
        assert len(recs) == 3 and all(r["task"] == name and r["output"] for r in recs)
        assert f"{name}/train: 0 bad rows skipped" in err
    rec = json.loads(
        main(["preview", "product_ner", "-n", "1"]) == 0 and capsys.readouterr().out.splitlines()[0]
    )
    assert re.fullmatch(r"(person|product-name|org-unit): .+", rec["output"].split(" | ")[0])

    monkeypatch.delenv(catalogue.ENV_VAR)  # the README's second way: template_dirs
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "template_dirs: [my_tasks]\n"
        "output_dir: runs/mine\n"
        f"model: {{name: {tiny_causal_dir}, max_length: 128, max_target_length: 32}}\n"
        "adapter: {r: 4, alpha: 8, dropout: 0.0}\n"
        "tasks:\n"
        + "".join(f"  - template: {n}\n" for n in TASKS)
        + "train: {steps: 2, batch_size: 2, warmup_steps: 0, report_to: none}\n"
        "eval: {limit: 4, max_new_tokens: 16}\n",
        encoding="utf-8",
    )
    assert main(["validate", "--config", str(cfg), *TASKS]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["mix", "--config", str(cfg), "--dump", "12", "--out", "mix.jsonl"]) == 0
    out, err = capsys.readouterr()
    assert "bad rows skipped: intent 0, paraphrase 0, product_ner 0" in err
    assert {
        json.loads(x)["task"] for x in (tmp_path / "mix.jsonl").read_text().splitlines()
    } <= set(TASKS)
    assert main(["train", "--config", str(cfg)]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    run = tmp_path / "runs" / "mine"
    assert out.strip() == str(Path("runs/mine")) or Path(out.strip()).resolve() == run.resolve()
    assert "bad rows skipped: intent 0, paraphrase 0, product_ner 0" in err
    # The run folder holds its templates and the shipped part they include: self-contained.
    assert (run / "templates" / "_shared" / "label_task.yaml").is_file()
    argv = ["eval", "--run", str(run), "--limit", "4", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((run / "eval" / "validation.json").read_text(encoding="utf-8"))
    assert set(res["tasks"]) == set(TASKS)
    assert all(res["tasks"][n]["n"] == 4 and "primary" in res["tasks"][n] for n in TASKS)
    assert main(["validate", "--oracle", "--config", str(cfg)]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------ the other README task shapes

SHAPES = ("science_mc", "topics", "to_french", "relatedness")


def _shape_rows(name: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if name == "science_mc":
        out = []
        for i in range(n):
            options = [f"option {j} of {i}" for j in range(rng.choice([3, 4]))]
            out.append(
                {
                    "question": f"Question {i}?",
                    "options": options,
                    "answer": rng.randrange(len(options)),
                }
            )
        return out
    if name == "topics":
        topics = ["politics", "sports", "business", "tech"]
        return [
            {"text": f"news item {i}", "topics": [t for t in topics if rng.random() < 0.4]}
            for i in range(n)
        ]
    if name == "to_french":
        pairs = [("Good morning.", "Bonjour."), ("Thank you very much.", "Merci beaucoup."),
                 ("Where is the station?", "Où est la gare ?")]  # fmt: skip
        return [
            {"en": a, "fr": b} | ({"references": [b.upper()]} if i % 3 == 0 else {})
            for i, (a, b) in enumerate(rng.choice(pairs) for _ in range(n))
        ]
    return [
        {
            "sentence1": f"first {i}",
            "sentence2": f"second {i}",
            "score": round(rng.uniform(1, 5), 1),
        }
        for i in range(n)
    ]


def test_readme_multiple_choice_multi_label_translation_and_regression_tasks_end_to_end(
    tmp_path, tiny_causal_dir, capsys, monkeypatch
):
    """The README's other task shapes, each from its own YAML block: validate and score 100 on the
    oracle, mix, train 2 steps on the tiny model together, and evaluate with an interval each."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my_tasks"
    for k, name in enumerate(SHAPES):
        text = readme_template(name)
        if name == "to_french":  # the README's optional other translations
            text = text.replace(
                "  fr: str\n", "  fr: str\n  references: {type: 'list[str]', required: false}\n"
            )
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
        for split, n in (("train", 16), ("validation", 8)):
            data = folder / "data" / name / f"{split}.jsonl"
            data.parent.mkdir(parents=True, exist_ok=True)
            rows = _shape_rows(name, n, seed=10 * k + (split == "train"))
            data.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
            )
    monkeypatch.setenv(catalogue.ENV_VAR, str(folder))
    assert main(["validate", "--oracle", *SHAPES]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    for name in SHAPES:
        assert re.search(
            rf"oracle {name} \(train, validation\): \S+ 100\.00, invalid 0\.0 %", err
        ), err
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "output_dir: runs/shapes\n"
        f"model: {{name: {tiny_causal_dir}, max_length: 128, max_target_length: 32}}\n"
        "adapter: {r: 4, alpha: 8, dropout: 0.0}\n"
        "tasks:\n"
        + "".join(f"  - template: {n}\n" for n in SHAPES)
        + "train: {steps: 2, batch_size: 2, warmup_steps: 0, report_to: none}\n"
        "eval: {limit: 4, max_new_tokens: 8}\n",
        encoding="utf-8",
    )
    assert main(["mix", "--config", str(cfg), "--dump", "12", "--out", "mix.jsonl"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(cfg)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    run = tmp_path / "runs" / "shapes"
    assert main(["eval", "--run", str(run), "--limit", "4", "--no-progress"]) == 0, (
        capsys.readouterr().err
    )
    res = json.loads((run / "eval" / "validation.json").read_text(encoding="utf-8"))
    primary = {
        "science_mc": "accuracy",
        "topics": "set_f1",
        "to_french": "chrf",
        "relatedness": "pearson",
    }
    for name, metric in primary.items():
        entry = res["tasks"][name]
        assert entry["primary_metric"] == metric and entry["n"] == 4, entry
        assert entry["mode"] == ("rank" if name == "science_mc" else "generate")
        assert entry["ci_low"] <= entry["primary"] <= entry["ci_high"]
