"""Handing a run to other tools: the HTML report (also in a headless browser), the Hub model card,
`export --push-to-hub` (Hub API replaced), `render` (prompt parity with the training collator) and
`export-task --to lm-eval` (files, hooks, and an lm-eval run whose scores equal `t2t-mtl eval`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from t2t_mtl.cli.main import main
from t2t_mtl.core.records import Record
from t2t_mtl.evaluation import model_card, run_report
from t2t_mtl.model import features
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.tasks import catalogue, sources

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one torch thread

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_models_root, tiny_causal_dir, tmp_path_factory):
    """The tiny staged run with large random LoRA weights (varied answers, as in test_inference),
    evaluated (3 rows per task) and with its forgetting report (2 rows per task)."""
    from safetensors.torch import load_file, save_file
    from tiny_runs import tiny_staged_run

    src = tiny_staged_run(tiny_models_root / "runs", tiny_causal_dir)
    dst = tmp_path_factory.mktemp("ecosystem") / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    f = dst / "adapter" / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.8 for k, v in load_file(f).items()}, f)
    argv = ["eval", "--run", str(dst), "--no-progress"]
    assert main([*argv, "--limit", "3"]) == 0
    assert main([*argv, "--limit", "2", "--forgetting"]) == 0
    return dst


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# ------------------------------------------------------------------ report


def test_realised_shares_are_the_mean_logged_share_per_stage():
    rows = [
        {"step": 1, "stage": "a", "share/x": 1.0},
        {"step": 2, "stage": "a", "share/x": 0.5, "share/y": 0.5},
        {"step": 2, "stage": "a", "eval/x": 10.0},  # an eval row: no shares
        {"step": 3, "stage": "b", "share/y": 1.0},
    ]
    assert run_report.realised_shares(rows, "a") == {"x": 0.75, "y": 0.25}
    assert run_report.realised_shares(rows, "b") == {"y": 1.0}
    assert run_report.realised_shares(rows, "c") == {}


def test_report_is_one_self_contained_page_with_every_section(run_dir, tmp_path, capsys):
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))  # this test edits its files
    preds = run_dir / "eval" / "validation.predictions.jsonl"
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    rows[0]["raw"] = "<script>alert(1)</script> & <b>"  # model output is untrusted text
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert main(["report", "--run", str(run_dir)]) == 0
    out = capsys.readouterr()
    page_path = run_dir / "report.html"
    assert out.out.strip() == str(page_path)
    page = page_path.read_text(encoding="utf-8")
    # self-contained: inline SVG plots, a data: PNG heatmap, nothing fetched, no script at all
    assert page.count("<svg") == 3  # mixture, loss, evaluation during training
    assert "data:image/png;base64," in page  # forgetting heatmap
    assert "<script" not in page and 'http-equiv="Content-Security-Policy"' in page
    assert 'src="http' not in page and 'href="http' not in page and "@import" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;" in page
    # mixture: stage first trains only sentiment (target 100 %, realised 100 %)
    mix = json.loads((run_dir / "mixture.json").read_text())["stages"]
    assert [s["stage"] for s in mix] == ["first", "second"]
    assert "<h3>stage first</h3>" in page and "100.0 %" in page
    # final table with intervals, from eval/validation.json
    res = json.loads((run_dir / "eval" / "validation.json").read_text())
    for name, e in res["tasks"].items():
        assert f"<td>{name}</td>" in page
        assert f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}]" in page
    assert "eval/forgetting.json" in page and "average forgetting" in page
    # predictions: the first rows of each task with gold and parse status
    for name in res["tasks"]:
        assert f"<h3>{name} <span class='note'>(" in page
    assert page.count('class="ok">parsed') + page.count('class="bad">invalid') == 9
    # the Hub card of the adapter, next to the page
    card = (run_dir / "adapter" / "README.md").read_text()
    assert front_matter(card)["library_name"] == "peft"


def test_report_of_a_run_without_results_says_what_to_run(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("eval"))
    (bare / "metrics.jsonl").unlink()
    page = run_report.build_report(bare)
    assert f"run <code>t2t-mtl eval --run {bare}</code>" in page
    assert f"<code>t2t-mtl eval --run {bare} --forgetting</code>" in page
    assert "metrics.jsonl has no loss rows" in page
    shutil.rmtree(bare / "adapter")  # still training: a page, but no card yet
    assert main(["report", "--run", str(bare)]) == 0
    assert "no final bundle (RUN/adapter) yet, so no model card" in capsys.readouterr().err
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_report_and_card_need_no_torch(run_dir):
    code = (
        "import sys\n"
        "from t2t_mtl.evaluation import model_card, run_report\n"
        "run_report.build_report(sys.argv[1]); model_card.model_card(sys.argv[1])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr[-2000:]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr"]
    return subprocess.run(
        [*cmd, "--v=0", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_report_loads_in_a_headless_browser_without_console_errors(run_dir, tmp_path):
    page = run_report.write_report(run_dir, tmp_path / "page.html")
    res = _chromium("--dump-dom", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    console = [x for x in res.stderr.splitlines() if "CONSOLE" in x]
    assert console == []  # no script errors, no blocked loads (CSP violations are logged here)
    assert "Mixture: target vs realised shares" in res.stdout and "<svg" in res.stdout
    shot = tmp_path / "shot.png"
    res = _chromium(
        "--hide-scrollbars", "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()
    )
    assert res.returncode == 0 and shot.stat().st_size > 50_000
    # the check can fail: a page that loads from the network is reported on the console
    bad = tmp_path / "bad.html"
    bad.write_text(
        page.read_text(encoding="utf-8").replace(
            "</main>", '<img src="https://example.com/x.png"></main>'
        ),
        encoding="utf-8",
    )
    res = _chromium("--dump-dom", bad.as_uri())
    assert any("Content Security Policy" in x for x in res.stderr.splitlines() if "CONSOLE" in x)


# ------------------------------------------------------------------ model card, export, push


def test_model_card_metadata_metrics_prompt_layout_and_licences(run_dir, tmp_path):
    card = model_card.model_card(run_dir, kind="adapter")
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local folder is not a Hub id
    assert meta["license"] == "unknown" and "datasets" not in meta  # bundled samples only
    assert meta["tags"][0] == "t2t-mtl" and "lora" in meta["tags"]
    res = json.loads((run_dir / "eval" / "validation.json").read_text())
    for name, e in res["tasks"].items():
        assert f"| {e['primary']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}] |" in card
        assert f"| {name} | {name} (1) |" in card  # template name and version
    fmt = PromptFormat.from_dict(
        json.loads((run_dir / "adapter" / "t2t_manifest.json").read_text())["prompt_format"]
    )
    assert "```text\n" + fmt.prompt(Record("", "{instruction}", "{input}", "")) in card
    assert "the Apache License 2.0" in card  # data/README.md's licence note of the samples
    # a task trained on a Hub dataset: listed in the metadata, its licence unknown
    hub = tmp_path / "hubrun"
    shutil.copytree(run_dir, hub)
    cfg = yaml.safe_load((hub / "config.yaml").read_text())
    cfg["tasks"][0]["source"] = {"hub": "stanfordnlp/sst2"}
    (hub / "config.yaml").write_text(yaml.safe_dump(cfg))
    card = model_card.model_card(hub, kind="merged")
    meta = front_matter(card)
    assert meta["datasets"] == ["stanfordnlp/sst2"] and meta["library_name"] == "transformers"
    assert "unknown (not recorded; see https://huggingface.co/datasets/stanfordnlp/sst2)" in card


def test_model_card_knows_the_embedded_base_model():
    assert model_card._base_model("embedded:smollm2-135m-instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
    )
    assert model_card._base_model("Qwen/Qwen2.5-1.5B") == ("Qwen/Qwen2.5-1.5B", "unknown")


class FakeHfApi:
    """Records what `export --push-to-hub` asks of the Hub (no network)."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, folder_path, repo_id, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        FakeHfApi.calls.append(("upload_folder", repo_id, files, kw))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


def test_export_writes_the_card_and_push_uploads_that_folder(
    run_dir, tmp_path, monkeypatch, capsys
):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    out = tmp_path / "merged"
    argv = ["export", "--run", str(run_dir), "--out", str(out)]
    assert main([*argv, "--push-to-hub", "me/tiny-multitask", "--private"]) == 0
    meta = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "t2t-mtl" in meta["tags"]
    (create, repo, kw), (upload, repo2, files, ukw) = FakeHfApi.calls
    assert (create, repo, kw["private"], kw["exist_ok"]) == (
        "create_repo",
        "me/tiny-multitask",
        True,
        True,
    )
    assert (upload, repo2, ukw["repo_type"]) == ("upload_folder", "me/tiny-multitask", "model")
    assert files == sorted(p.name for p in out.iterdir())
    assert {"README.md", "config.json", "model.safetensors", "t2t_export.json"} <= set(files)
    assert "pushed" in capsys.readouterr().err
    # a bad repo id fails before the slow merge
    FakeHfApi.calls = []
    assert main([*argv, "--force", "--push-to-hub", "not a repo id"]) == 2
    assert "--push-to-hub" in capsys.readouterr().err and FakeHfApi.calls == []


def test_push_errors_are_reported_without_a_traceback(run_dir, tmp_path, monkeypatch):
    import huggingface_hub

    from t2t_mtl.core.errors import ConfigError
    from t2t_mtl.inference.predictor import EXPORT_MARKER, push_to_hub

    class NoToken(FakeHfApi):
        def create_repo(self, repo_id, **kw):
            raise OSError("no token found")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    (tmp_path / EXPORT_MARKER).write_text("{}")
    with pytest.raises(ConfigError, match="no token found.*hf auth login"):
        push_to_hub(tmp_path, "me/x")
    with pytest.raises(ConfigError, match="not a t2t-mtl export"):
        push_to_hub(run_dir, "me/x")


# ------------------------------------------------------------------ render


def _training_prompts(run_dir, task: str, n: int, *, as_eval: bool = False):
    """(rows without answers, the prompt token ids the training collator builds for them);
    `as_eval`: the rows an eval `--limit n` draws (a seeded random subset), else the first n."""
    from tiny_runs import training_prompt_ids

    from t2t_mtl.inference.predictor import Predictor

    pred = Predictor.for_prompts(run_dir)
    tpl = pred.template(task)
    seed = f"{pred.run.cfg.seed}|{task}" if as_eval else None
    rows = sources.load_rows(tpl, None, "validation", limit=n, seed=seed)
    ids = training_prompt_ids(pred, tpl, rows)
    plain = [{k: v for k, v in rows[i].items() if k != tpl.label_field} for i in range(len(rows))]
    return pred, plain, ids


@pytest.mark.parametrize("task", ["sentiment_sst2", "ner_conll2003"])
def test_render_text_is_the_decoded_training_prompt(run_dir, tmp_path, task, capsys):
    pred, plain, train_ids = _training_prompts(run_dir, task, 4)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in plain))
    out = tmp_path / "out.jsonl"
    argv = ["render", "--run", str(run_dir), "--task", task, "--input", str(rows)]
    assert main([*argv, "--format", "text", "--output", str(out)]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    tok = pred.tokenizer
    assert [g["line"] for g in got] == [1, 2, 3, 4]
    for g, ids in zip(got, train_ids):
        assert not g["truncated"]
        assert g["prompt"] == tok.decode(ids)  # the exact text training's collator tokenised
        assert tok(g["prompt"], add_special_tokens=False)["input_ids"] == ids  # and back
    # messages: the model's own chat template (what a server applies) gives the same text
    assert main([*argv, "--format", "messages"]) == 0
    msgs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for m, g in zip(msgs, got):
        assert [x["role"] for x in m["messages"]] == ["user"]
        served = tok.apply_chat_template(m["messages"], add_generation_prompt=True, tokenize=False)
        assert served == g["prompt"] == pred.fmt.render_chat(m["messages"], True)


def test_render_shortens_an_overlong_input_as_training_does(run_dir, tmp_path, capsys):
    pred, _, _ = _training_prompts(run_dir, "sentiment_sst2", 1)
    long = " ".join(["a truly remarkable and moving film"] * 200)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": long, "id": 7}) + "\n" + '{"txt": "x"}\n{"text": "  "}\n')
    argv = ["render", "--run", str(run_dir), "--task", "sentiment_sst2", "--input", str(rows)]
    assert main([*argv, "--format", "text"]) == 2  # a bad row: nothing written (default fail)
    err = capsys.readouterr().err
    assert f"{rows}:2: missing field 'text'" in err
    assert f"{rows}:3: empty text in field 'text'" in err  # as training rejects it
    assert main([*argv, "--format", "text", "--bad-rows", "skip"]) == 0
    (text,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rec = pred.render("sentiment_sst2", {"text": long})
    ids, cut = features.prompt_ids(pred.tokenizer, pred.fmt, rec, pred.max_prompt_tokens)
    assert cut and text["truncated"] and text["id"] == 7
    assert pred.tokenizer(text["prompt"], add_special_tokens=False)["input_ids"] == ids
    assert main([*argv, "--format", "messages", "--bad-rows", "skip"]) == 0
    (msg,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert features.MIDDLE_MARK in msg["messages"][0]["content"]
    assert pred.fmt.render_chat(msg["messages"], True) == text["prompt"]
    assert isinstance(rec, Record)


def test_render_messages_needs_a_chat_format(run_dir, tmp_path, capsys):
    plain = tmp_path / "plainrun"
    shutil.copytree(run_dir, plain)
    man_file = plain / "adapter" / "t2t_manifest.json"
    man = json.loads(man_file.read_text())
    man["prompt_format"] = PromptFormat(kind="plain", answer_suffix="<|im_end|>").to_dict()
    man_file.write_text(json.dumps(man))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n')
    argv = ["render", "--run", str(plain), "--task", "sentiment_sst2", "--input", str(rows)]
    assert main([*argv, "--format", "messages"]) == 2
    assert (
        "--format messages needs a chat prompt format; this run's is 'plain'"
        in capsys.readouterr().err
    )
    assert main([*argv, "--format", "text"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"].startswith("### Instruction:\n")


# ------------------------------------------------------------------ export-task --to lm-eval


def _load_lm_eval_yaml(path: Path) -> dict:
    """The task YAML read by lm-eval's own loader (resolving `!function` hooks in utils.py)."""
    loader = pytest.importorskip("lm_eval.tasks._yaml_loader")
    return loader.load_yaml(path)


def test_export_task_writes_an_lm_eval_task_whose_hooks_score_like_eval(
    run_dir, tmp_path, monkeypatch
):
    out = tmp_path / "lm"
    for task in ("sentiment_sst2", "ner_conll2003"):
        argv = ["export-task", task, str(out), "--to", "lm-eval", "--run", str(run_dir)]
        assert main([*argv, "--limit", "3"]) == 0
    conf = _load_lm_eval_yaml(out / "sentiment_sst2.yaml")
    assert conf["task"] == "sentiment_sst2" and conf["output_type"] == "generate_until"
    assert conf["dataset_path"] == "json" and conf["test_split"] == "test"
    data = Path(conf["dataset_kwargs"]["data_files"]["test"])
    assert data == out.resolve() / "sentiment_sst2.validation.jsonl"
    assert conf["doc_to_text"] == "prompt" and conf["generation_kwargs"]["until"] == ["<|im_end|>"]
    assert conf["generation_kwargs"]["do_sample"] is False
    assert [m["metric"] for m in conf["metric_list"]] == ["accuracy", "macro_f1", "invalid_rate"]
    assert all(callable(m["aggregation"]) for m in conf["metric_list"])
    docs = [json.loads(x) for x in data.read_text().splitlines()]
    # the prompts are the training prompts (render's text)
    rows = tmp_path / "rows.jsonl"
    _, plain, train_ids = _training_prompts(run_dir, "sentiment_sst2", 3, as_eval=True)
    rows.write_text("".join(json.dumps(r) + "\n" for r in plain))
    from t2t_mtl.inference.predictor import Predictor, render_file

    pred = Predictor.for_prompts(run_dir)
    served, _ = render_file(pred, "sentiment_sst2", rows)
    assert [d["prompt"] for d in docs] == [s["prompt"] for s in served]
    # the hooks score as `t2t-mtl eval` does (evaluator.score_task on the same answers)
    process, agg = (
        conf["process_results"],
        {m["metric"]: m["aggregation"] for m in conf["metric_list"]},
    )
    answers = [" Positive.", "the review is negative", "no idea"]
    items = [process(d, [a]) for d, a in zip(docs, answers)]
    from t2t_mtl.evaluation.evaluator import Example, score_task

    tpl = pred.template("sentiment_sst2")
    exs = [Example(Record("s", "", "", "", {"row_id": d["row_id"]}), d["gold"]) for d in docs]
    summary, _ = score_task(tpl, exs, [a.strip() for a in answers])
    for key in ("accuracy", "macro_f1"):
        assert agg[key]([it[key] for it in items]) == pytest.approx(summary["metrics"][key])
    assert agg["invalid_rate"]([it["invalid_rate"] for it in items]) == pytest.approx(100 / 3)
    # NER: the gold tags and tokens travel with the documents; the gold answer scores 100
    ner = _load_lm_eval_yaml(out / "ner_conll2003.yaml")
    assert [m["metric"] for m in ner["metric_list"]][:3] == [
        "span_precision",
        "span_recall",
        "span_f1",
    ]
    ndocs = [
        json.loads(x) for x in (out / "ner_conll2003.validation.jsonl").read_text().splitlines()
    ]
    assert all(len(d["gold"]) == len(d["tokens"]) for d in ndocs)
    items = [ner["process_results"](d, [d["target"]]) for d in ndocs]
    f1 = {m["metric"]: m["aggregation"] for m in ner["metric_list"]}["span_f1"]
    assert f1([it["span_f1"] for it in items]) == 100.0
    index = json.loads((out / "t2t_tasks.json").read_text())
    assert sorted(index) == ["ner_conll2003", "sentiment_sst2"]
    assert (out / index["ner_conll2003"]["template_file"]).is_file()
    # Moved where the templates' relative `samples:` folders do not exist (lm-eval run from
    # another checkout or machine): the hooks still parse and score (the rows are the jsonl).
    import shutil

    from t2t_mtl.tasks import schema

    moved = tmp_path / "elsewhere" / "lm"
    shutil.copytree(out, moved)
    monkeypatch.setattr(schema, "PROJECT_ROOT", tmp_path / "no_checkout")
    monkeypatch.chdir(tmp_path)
    far = _load_lm_eval_yaml(moved / "sentiment_sst2.yaml")
    assert far["process_results"](docs[0], [" Positive."]) == process(docs[0], [" Positive."])


def test_export_task_from_a_run_config_uses_its_base_models_tokenizer(tiny_causal_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "lm"
    cfg = str(REPO / "launch/configs/tiny_cpu.yaml")
    argv = ["export-task", "qa_squad", "--to", "lm-eval", str(out), "--limit", "2"]
    assert main([*argv, "--config", cfg, f"model.name={tiny_causal_dir}"]) == 0
    docs = [json.loads(x) for x in (out / "qa_squad.validation.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(tiny_causal_dir)
    fmt = PromptFormat.for_tokenizer(tok, "causal")
    tpl = catalogue.load_task("qa_squad")
    rows = sources.load_rows(tpl, None, "validation", limit=2)
    vid = tpl.train_variants()[0].id
    assert len(docs) == 2
    for i, d in enumerate(docs):
        rec = tpl.render(rows[i], vid, row_id=str(i), split="validation")
        ids, cut = features.prompt_ids(tok, fmt, rec, 128)  # tiny_cpu's model.max_length
        assert cut and features.MIDDLE_MARK in d["prompt"]  # shortened in the middle, as eval does
        assert tok(d["prompt"], add_special_tokens=False)["input_ids"] == ids


def test_export_task_mistakes_exit_2(run_dir, tmp_path, capsys):
    out = str(tmp_path / "lm")
    assert (
        main(["export-task", "sentimnt_sst2", out, "--to", "lm-eval", "--run", str(run_dir)]) == 2
    )
    assert "did you mean 'sentiment_sst2'" in capsys.readouterr().err
    assert (
        main(
            [
                "export-task",
                "qa_squad",
                out,
                "--to",
                "lm-eval",
                "--run",
                str(run_dir),
                "--limit",
                "0",
            ]
        )
        == 2
    )


def _lm_eval(model: Path, include: Path, tasks: list[str], limit: int) -> tuple[dict, dict]:
    """Run lm-eval's `hf` backend offline in a subprocess; returns its results table and, per
    task, the generated answers in document order."""
    pytest.importorskip("lm_eval")
    script = (
        "import json, sys, lm_eval\n"
        "from lm_eval.tasks import TaskManager\n"
        "model, include, limit, *tasks = sys.argv[1:]\n"
        "res = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={model},dtype=float32',"
        " tasks=tasks, task_manager=TaskManager(include_path=include), limit=int(limit),"
        " batch_size=1, device='cpu', log_samples=True)\n"
        "answers = {t: [s['filtered_resps'][0] for s in sorted(res['samples'][t],"
        " key=lambda s: s['doc_id'])] for t in tasks}\n"
        "print(json.dumps([res['results'], answers]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script, str(model), str(include), str(limit), *tasks],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results, answers = json.loads(res.stdout.strip().splitlines()[-1])
    return results, answers


def _first_line(text: str) -> str:
    return next((x.strip() for x in text.splitlines() if x.strip()), "")


def _assert_same_scores(lm: dict, ours: dict, tasks: list[str]) -> None:
    for task in tasks:
        e = ours["tasks"][task]
        for key, value in e["metrics"].items():
            assert lm[task][f"{key},none"] == pytest.approx(value, abs=1e-6), (task, key)
        assert lm[task]["invalid_rate,none"] == pytest.approx(e["invalid_rate"], abs=1e-6)


def test_lm_eval_scores_an_exported_model_like_t2t_mtl_eval(run_dir, tmp_path):
    """The tiny run merged into a plain model, scored by lm-eval on the exported tasks: the same
    numbers as `t2t-mtl eval` on the run (adapter unmerged) for the same rows."""
    tasks, limit = ["sentiment_sst2", "qa_squad"], 3
    merged = tmp_path / "merged"
    assert main(["export", "--run", str(run_dir), "--out", str(merged)]) == 0
    lm = tmp_path / "lm"
    for task in tasks:
        argv = ["export-task", task, str(lm), "--to", "lm-eval", "--run", str(run_dir)]
        assert main([*argv, "--limit", str(limit)]) == 0
    ours = json.loads((run_dir / "eval" / "validation.json").read_text())  # --limit 3 (fixture)
    assert all(ours["tasks"][t]["n"] == limit for t in tasks)
    results, answers = _lm_eval(merged, lm, tasks, limit)
    _assert_same_scores(results, ours, tasks)
    # the tiny model scores 0 on these rows, so compare the answers themselves too: the same
    # first line (all the label and span parsers read; eval stops generating after it)
    preds = [
        json.loads(x)
        for x in (run_dir / "eval" / "validation.predictions.jsonl").read_text().splitlines()
    ]
    for task in tasks:
        raw = [p["raw"] for p in preds if p["task"] == task]
        assert [_first_line(a) for a in answers[task]] == [_first_line(r) for r in raw]
        assert all(_first_line(r) for r in raw)  # non-empty answers: the check can fail


@pytest.mark.slow
def test_lm_eval_on_the_embedded_model_equals_eval_base(tmp_path):
    """SmolLM2 (the embedded model's local safetensors copy) through lm-eval's `hf` backend on the
    exported tasks gives `t2t-mtl eval --base`'s scores on the same 5 rows (slow: ~4 min on 2 CPUs)."""
    from t2t_mtl.model.loading import embedded_copy

    tasks, limit = ["sentiment_sst2", "qa_squad", "ner_conll2003"], 5
    run = tmp_path / "run"
    spec = "[" + ", ".join(f"{{template: {t}}}" for t in tasks) + "]"
    train = [
        "train",
        "--config",
        str(REPO / "launch/configs/tiny_cpu.yaml"),
        "model.name=embedded:smollm2-135m-instruct",
        f"output_dir={run}",
        "train.steps=1",
        "train.batch_size=1",
        "model.max_length=384",
        "eval.max_new_tokens=24",
        f"tasks={spec}",
    ]
    assert main(train) == 0
    assert main(["eval", "--run", str(run), "--base", "--limit", str(limit), "--no-progress"]) == 0
    ours = json.loads((run / "eval" / "validation-base.json").read_text())
    lm = tmp_path / "lm"
    for task in tasks:
        argv = ["export-task", task, str(lm), "--to", "lm-eval", "--run", str(run)]
        assert main([*argv, "--limit", str(limit)]) == 0
    _assert_same_scores(_lm_eval(embedded_copy(), lm, tasks, limit)[0], ours, tasks)
