"""Inference: train/inference prompt parity (golden), Predictor API, `predict` / `prompt` / `export` CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from t2t_mtl.cli.main import main
from t2t_mtl.core.errors import DataError, Problem
from t2t_mtl.core.records import Record
from t2t_mtl.inference.predictor import Predictor, structured
from t2t_mtl.model import features
from t2t_mtl.model.generation import _left_pad
from t2t_mtl.model.prompt_format import PromptFormat
from t2t_mtl.tasks import sources
from t2t_mtl.tasks.task import load_task_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one torch thread


@pytest.fixture(scope="module")
def run_dir(tiny_models_root, tiny_causal_dir, tmp_path_factory):
    """The tiny staged run with its final adapter's LoRA weights made large (as long training would),
    so the tuned model's greedy answers are varied text and differ from the base model's."""
    from safetensors.torch import load_file, save_file
    from tiny_runs import tiny_staged_run

    src = tiny_staged_run(tiny_models_root / "runs", tiny_causal_dir)
    dst = tmp_path_factory.mktemp("inference") / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    f = dst / "adapter" / "adapter_model.safetensors"
    weights = load_file(f)
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.8 for k, v in weights.items()}, f)
    return dst


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.from_run(run_dir, max_new_tokens=8)


def _capture_generate(model, seen: list):
    """Record the prompt tensors the model receives (the exact prompt ids it sees): the arguments
    of `generate`, or, for causal models decoded by `generation._compact_greedy`, of each batch's
    prefill (the prompts, or the prefix they share and then each one's rest; later passes feed
    one token each). Returns a function that removes the spies."""
    orig_generate, orig_forward = model.generate, model.forward
    own = {k: model.__dict__[k] for k in ("generate", "forward") if k in model.__dict__}
    inside = []

    def spy_generate(**kw):
        seen.append((kw["input_ids"].clone(), kw["attention_mask"].clone()))
        inside.append(True)
        try:
            return orig_generate(**kw)
        finally:
            inside.pop()

    def spy_forward(*args, **kw):
        ids, mask = kw.get("input_ids"), kw.get("attention_mask")
        if not inside and ids is not None and mask is not None:
            if ids.shape == mask.shape:  # whole prompts, or a prefix the batch shares
                seen.append((ids.clone(), mask.clone()))
            elif ids.shape[1] > 1:  # each prompt's rest after the shared prefix just run
                prefix = seen.pop()[0][0].tolist()
                rest = mask[:, -ids.shape[1] :]
                rows = [prefix + ids[r][rest[r].bool()].tolist() for r in range(ids.shape[0])]
                full, full_mask = _left_pad(rows, 0, "cpu")
                assert (rest[:, -1] == 1).all()  # the rests are left-padded too
                seen.append((full, full_mask))
        return orig_forward(*args, **kw)

    model.generate, model.forward = spy_generate, spy_forward

    def restore():
        for k in ("generate", "forward"):
            if k in own:
                setattr(model, k, own[k])  # e.g. a forward wrapped by accelerate's hooks
            else:
                delattr(model, k)  # back to the class method

    return restore


def _unpadded(seen) -> list[list[int]]:
    return [ids[r][mask[r].bool()].tolist() for ids, mask in seen for r in range(ids.shape[0])]


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("task", ["sentiment_sst2", "ner_conll2003"])
def test_inference_prompt_ids_are_the_training_prompt_ids(predictor, run_dir, task):
    tpl = predictor.template(task)
    rows = sources.load_rows(tpl, None, "validation", limit=3)
    assert predictor.fmt == PromptFormat.from_dict(
        json.loads((run_dir / "adapter" / "t2t_manifest.json").read_text())["prompt_format"]
    )
    # training path: render with the answer, encode, collate; the prompt is where labels are -100
    from tiny_runs import training_prompt_ids

    train_prompts = training_prompt_ids(predictor, tpl, rows)
    # inference path: the same rows without their answers, through the Predictor
    label_field = tpl.label_field
    plain = [{k: v for k, v in rows[i].items() if k != label_field} for i in range(len(rows))]
    seen: list = []
    restore = _capture_generate(predictor.model, seen)
    try:
        predictor.predict(task, plain)
    finally:
        restore()
    got = _unpadded(seen)
    assert sorted(got) == sorted(train_prompts)
    assert all(seen[0][1][:, -1] == 1)  # left padding: every row's last column is a real token
    rec = predictor.render(task, plain[0])
    assert predictor.prompt_ids(rec) == train_prompts[0]
    assert predictor.tokenizer.decode(train_prompts[0]).startswith(
        "<|im_start|>system\n"
    )  # the chat layout, system message kept


def test_seq2seq_prompt_parity_with_the_training_collator(tiny_t5_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    fmt = PromptFormat.for_tokenizer(tok, "seq2seq")
    recs = [
        Record("t", "Is the sentiment positive or negative?", x, "positive")
        for x in ("good film", "a " * 20)
    ]
    batch = features.Seq2SeqCollator(tok.pad_token_id)(
        [features.encode(r, tok, fmt, 64, 16) for r in recs]
    )
    train = [
        batch["input_ids"][r][batch["attention_mask"][r] == 1].tolist() for r in range(len(recs))
    ]
    seen: list = []
    _capture_generate(model, seen)
    pred = Predictor(model, tok, fmt, max_new_tokens=3, max_prompt_tokens=64)
    pred.generate([Record(r.task, r.instruction, r.input, "") for r in recs])
    assert sorted(_unpadded(seen)) == sorted(train)
    assert train[0][-1] == tok.eos_token_id


# ------------------------------------------------------------------ predict


def _write_lines(path, lines):
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def test_predict_cli_reports_every_bad_row_with_file_and_line(run_dir, tmp_path, capsys):
    inp = _write_lines(
        tmp_path / "in.jsonl",
        [
            json.dumps({"text": "a fine film", "id": "a"}),
            "{not json",
            json.dumps({"txt": "typo"}),
            "",
            json.dumps({"text": 3}),
            json.dumps(["a list"]),
            json.dumps({"sentence": "hub column name, mapped by the template"}),
        ],
    )
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--task",
                "sentiment_sst2",
                "--input",
                str(inp),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    for line, text in (
        (2, "not valid JSON"),
        (3, "missing field 'text' (the row has 'txt'"),
        (5, "field 'text' should be str, got int"),
        (6, "expected a JSON object"),
    ):
        assert f"{inp}:{line}: {text}" in err
    assert "Traceback" not in err and not out.exists()

    assert (
        main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--task",
                "sentiment_sst2",
                "--input",
                str(inp),
                "--output",
                str(out),
                "--no-progress",
                "--bad-rows",
                "skip",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 7] and rows[0]["id"] == "a"
    assert all(set(r["prediction"]) == {"label"} and isinstance(r["raw"], str) for r in rows)
    assert not list(tmp_path.glob("*.tmp"))
    assert "4 bad row(s) skipped" in capsys.readouterr().err


def test_predict_cli_ner_and_qa_structured_output_matches_the_python_api(
    run_dir, predictor, tmp_path, capsys
):
    ner_rows = [{"tokens": ["Anna", "lives", "in", "Paris", "."]}, {"tokens": ["Nothing", "here"]}]
    inp = _write_lines(tmp_path / "ner.jsonl", [json.dumps(r) for r in ner_rows])
    out = tmp_path / "ner_out.jsonl"
    assert (
        main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--task",
                "ner_conll2003",
                "--input",
                str(inp),
                "--output",
                str(out),
                "--no-progress",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    got = [json.loads(x) for x in out.read_text().splitlines()]
    for row, g in zip(ner_rows, got):
        assert set(g["prediction"]) == {"entities", "tags"} and len(g["prediction"]["tags"]) == len(
            row["tokens"]
        )
        assert g["raw"]  # the perturbed adapter writes text
    api = predictor.predict("ner_conll2003", ner_rows)
    assert [{k: v for k, v in g.items() if k != "line"} for g in got] == api
    qa = predictor.predict(
        "qa_squad", [{"context": "Paris is in France.", "question": "Where is Paris?"}]
    )
    assert set(qa[0]["prediction"]) == {"answer"}
    with pytest.raises(DataError) as e:
        predictor.predict(
            "qa_squad", [{"context": "x", "question": "y"}, {"question": "no context"}]
        )
    assert "<rows>:2: missing field 'context'" in str(e.value)
    with pytest.raises(DataError) as e:
        predictor.predict("qa_squad", [{"context": None, "question": "y"}])
    assert "<rows>:1: field 'context' is null" in str(e.value)
    with pytest.raises(DataError) as e:
        predictor.predict("ner_conll2003", [{"tokens": []}])
    assert "field 'tokens' is an empty list" in str(e.value)


def test_structured_prediction_of_a_number_and_a_translation(repo_root):
    oracle = repo_root / "tests" / "fixtures" / "oracle"
    rel = load_task_file(oracle / "relatedness.yaml")
    assert structured(rel, rel.parse_output("Score: 4,5")) == {"value": 4.5}
    assert structured(rel, rel.parse_output("no idea")) == {"value": None}
    tr = load_task_file(oracle / "translation.yaml")
    assert structured(tr, tr.parse_output(" Il pleut. \n")) == {"text": "Il pleut."}


# ------------------------------------------------------------------ prompt


def test_prompt_cli_task_fields_free_instruction_and_base(run_dir, predictor, capsys):
    assert (
        main(
            [
                "prompt",
                "--run",
                str(run_dir),
                "--task",
                "sentiment_sst2",
                "text=a fine film",
                "--json",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out == predictor.prompt("sentiment_sst2", text="a fine film")
    assert out["raw"] and set(out["prediction"]) == {"label"}

    assert (
        main(
            [
                "prompt",
                "--run",
                str(run_dir),
                "--task",
                "ner_conll2003",
                "tokens=Anna lives in Paris",
                "--max-new-tokens",
                "8",
                "--json",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["prediction"]["tags"]) == 4

    assert (
        main(
            [
                "prompt",
                "--run",
                str(run_dir),
                "--instruction",
                "Name a city.",
                "--max-new-tokens",
                "8",
                "--show-prompt",
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    tuned = cap.out.strip()
    assert tuned == predictor.ask("Name a city.") and tuned
    assert "<|im_start|>user\nName a city.<|im_end|>" in cap.err
    assert (
        main(
            [
                "prompt",
                "--run",
                str(run_dir),
                "--instruction",
                "Name a city.",
                "--max-new-tokens",
                "8",
                "--base",
            ]
        )
        == 0
    )
    base = capsys.readouterr().out.strip()
    assert base == Predictor.from_run(run_dir, base=True, max_new_tokens=8).ask("Name a city.")
    assert base != tuned  # the base model answers without the adapter


def test_prompt_cli_mistakes(run_dir, capsys):
    assert (
        main(["prompt", "--run", str(run_dir), "--task", "qa_squad", "contxt=x", "question=y"]) == 2
    )
    assert "has no field 'contxt' (did you mean 'context'?)" in capsys.readouterr().err
    assert main(["prompt", "--run", str(run_dir), "--task", "qa_squad", "question=y"]) == 2
    assert "<fields>: missing field 'context'" in capsys.readouterr().err
    assert main(["prompt", "--run", str(run_dir)]) == 2
    assert main(["prompt", "--run", str(run_dir), "--task", "sentimnt_sst2", "text=x"]) == 2
    assert "did you mean 'sentiment_sst2'" in capsys.readouterr().err
    argv = ["prompt", "--run", str(run_dir), "--task", "sentiment_sst2", "text=a", "text=b"]
    assert main(argv) == 2
    assert "field 'text' is given twice" in capsys.readouterr().err


# ------------------------------------------------------------------ export


def test_export_merges_the_adapter_into_a_plain_transformers_model(
    run_dir, predictor, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    assert (out / "t2t_manifest.json").is_file() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert not hasattr(model, "peft_config")
    recs = [
        predictor.render("sentiment_sst2", {"text": t})
        for t in ("a fine film", "dull and far too long")
    ]
    recs.append(Record("free", "Name a city.", "", ""))
    expected = predictor.generate(recs)
    assert all(expected) and len(set(expected)) > 1
    merged = Predictor(model, tok, predictor.fmt, max_new_tokens=8, max_prompt_tokens=512).generate(
        recs
    )
    assert merged == expected
    ids = torch.tensor([predictor.prompt_ids(recs[0])])
    with torch.no_grad():
        a, b = predictor.model(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((out / "t2t_manifest.json").read_text())["model"]["name"]
    )
    with torch.no_grad():
        assert (base(input_ids=ids).logits - b).abs().max() > 1e-2  # the merge changed the weights

    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_export_of_a_qlora_run_reloads_the_base_unquantised(run_dir, tmp_path):
    q = tmp_path / "qrun"
    shutil.copytree(run_dir, q)
    man_file = q / "adapter" / "t2t_manifest.json"
    man = json.loads(man_file.read_text())
    man["adapter"].update(method="qlora", compute_dtype="bfloat16")  # as a QLoRA run records it
    man_file.write_text(json.dumps(man))
    assert main(["export", "--run", str(q), "--out", str(tmp_path / "merged")]) == 0
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (
        "quantization_config" not in cfg and cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    )
    exported = json.loads((tmp_path / "merged" / "t2t_manifest.json").read_text())
    assert exported["bundle"]["kind"] == "full" and exported["bundle"]["adapter_method"] == "qlora"


def test_predict_accepts_rows_in_the_hub_schema(predictor):
    """Rows as the hub dataset has them (SST-2's `sentence` column, integer gold label) render like training's:
    the template's column and label maps apply, and a gold label is not needed to predict."""
    recs, problems = predictor.render_rows(
        "sentiment_sst2",
        [
            ("rows.jsonl:1", {"idx": 0, "sentence": "a marvel of restraint .", "label": 1}),
            ("rows.jsonl:2", {"sentence": "tiresome ."}),
            ("rows.jsonl:3", {"idx": 2, "label": 0}),
        ],
    )
    assert [r is not None for r in recs] == [True, True, False]
    assert "a marvel of restraint ." in recs[0].input
    assert (
        len(problems) == 1
        and problems[0].line == 3
        and "missing field 'text'" in problems[0].message
    )


def test_inference_merges_lora_only_where_the_answers_stay(run_dir, predictor):
    """eval.merge_adapter: a LoRA adapter on float32 weights is merged (no LoRA layers left, the
    same logits and answers); on bf16 weights it is kept apart (the merge would round it away)."""
    from peft import PeftModel

    from t2t_mtl.model.loading import load_for_inference, merge_lora_for_inference

    kept, tok, _, _ = load_for_inference(run_dir / "adapter")
    merged, *_ = load_for_inference(run_dir / "adapter", merge=True)
    assert isinstance(kept, PeftModel) and not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    recs = [
        predictor.render("sentiment_sst2", {"text": t}) for t in ("a fine film", "dull and long")
    ]
    recs.append(Record("free", "Name a city.", "", ""))
    ids = torch.tensor([predictor.prompt_ids(recs[0])])
    with torch.no_grad():
        assert torch.allclose(kept(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    answers = [
        Predictor(m, tok, predictor.fmt, max_new_tokens=8, max_prompt_tokens=512).generate(recs)
        for m in (kept, merged)
    ]
    assert answers[0] == answers[1] and answers[0] == predictor.generate(recs)
    assert not isinstance(predictor.model, PeftModel)  # the run's eval.merge_adapter: true
    half = kept.to(torch.bfloat16)
    assert merge_lora_for_inference(half) is half
    assert merge_lora_for_inference(merged) is merged  # nothing to merge


def test_verb_option_mistakes_are_refused_before_any_work(run_dir, tmp_path, capsys):
    """Outputs that cannot be written or would replace the input, options that need another one,
    a budget of no tokens, a split no task has, a mode none of the tasks takes, a source given
    twice: exit 2 with the option named, nothing written."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a fine film"}) + "\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    run = str(run_dir)
    cases = [
        (["predict", "--run", run, "--task", "sentiment_sst2", "--input", str(rows),
          "--output", str(rows)], "--output: ", "is also an input"),
        (["render", "--run", run, "--task", "sentiment_sst2", "--input", str(rows),
          "--output", str(rows)], "--output: ", "is also an input"),
        (["report", "--run", run, "--out", str(a_file / "r.html")], "--out: ", "is a file"),
        (["export-task", "sentiment_sst2", str(a_file), "--to", "lm-eval", "--run", run],
         "DIR: ", "is a file, not a folder"),
        (["export-task", "sentiment_sst2", "", "--to", "lm-eval", "--run", run],
         "DIR: ", "the path is empty"),
        (["compare", run, run, "--out", str(tmp_path)], "--out: ", "is a folder"),
        (["predict", "--run", run, "--task", "sentiment_sst2", "--input", str(rows),
          "--output", str(tmp_path / "p.jsonl"), "--max-new-tokens", "0"],
         "--max-new-tokens must be > 0", ""),
        (["eval", "--run", run, "--with-base"], "--with-base adds the base model", ""),
        (["export", "--run", run, "--out", str(tmp_path / "x"), "--private"],
         "--private needs --push-to-hub", ""),
        (["eval", "--run", run, "--tasks", "qa_squad", "--mode", "rank", "--limit", "2"],
         "--mode rank applies to label tasks; 'qa_squad' (span) is not one", ""),
        (["compare", run, f"again={run}"], "given twice", ""),
    ]  # fmt: skip
    for argv, fragment, more in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and more in err and "Traceback" not in err, (argv, err)
    assert rows.read_text() == json.dumps({"text": "a fine film"}) + "\n"
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "p.jsonl").exists()


def test_outputs_never_replace_a_run_folders_parts_or_a_users_files(run_dir, tmp_path, capsys):
    """A command that reads a run refuses an output over (or inside) what the run is made of;
    export-task refuses a folder holding files it did not write (a template, a user's utils.py),
    and exports again into its own folder."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "a fine film"}) + "\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    mine = tmp_path / "proj"
    mine.mkdir()
    (mine / "utils.py").write_text("print('my code')\n")
    cases = [
        (["render", "--run", str(run), "--task", "sentiment_sst2", "--input", str(rows),
          "--output", str(run / "config.yaml")], "--output: ", "is also an input"),
        (["predict", "--run", str(run), "--task", "sentiment_sst2", "--input", str(rows),
          "--output", str(run / "adapter" / "p.jsonl")], "--output: ", "which this command reads"),
        (["report", "--run", str(run), "--out", str(run / "metrics.jsonl")], "--out: ", "is also an input"),
        (["compare", str(run), f"b={run_dir}", "--json", str(run / "adapter" / "x.json")],
         "--json: ", "which this command reads"),
        (["export-task", "sentiment_sst2", str(run / "templates"), "--to", "lm-eval", "--run", str(run)],
         "DIR ", "export-task did not write"),
        (["export-task", "sentiment_sst2", str(mine), "--to", "lm-eval", "--run", str(run)],
         "DIR ", "export-task did not write (utils.py)"),
    ]  # fmt: skip
    for argv, fragment, more in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and more in err and "Traceback" not in err, (argv, err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert (mine / "utils.py").read_text() == "print('my code')\n"
    # a user's own file beside the run's parts is theirs to replace; an export folder re-exports
    assert main(["render", "--run", str(run), "--task", "sentiment_sst2", "--input", str(rows),
                 "--output", str(run / "prompts.jsonl")]) == 0  # fmt: skip
    out = tmp_path / "lm"
    for _ in range(2):
        assert main(["export-task", "sentiment_sst2", str(out), "--to", "lm-eval", "--run",
                     str(run), "--limit", "2"]) == 0  # fmt: skip
    capsys.readouterr()


def test_predict_answers_with_evals_budget_and_stop(run_dir):
    """`predict`/`prompt` give a task's answers the budget and first-line stop eval gives them,
    unless a budget is asked for."""
    pred = Predictor.from_run(run_dir)
    budget, first_line = pred.budget("sentiment_sst2")
    assert first_line and 0 < budget <= pred.max_new_tokens
    assert pred.budget("qa_squad")[1] and not pred.budget("ner_conll2003")[1]
    fixed = Predictor.from_run(run_dir, max_new_tokens=5)
    assert fixed.budget("sentiment_sst2") == (5, False)


def test_eval_of_a_split_no_task_has_fails_before_the_model_and_writes_nothing(
    run_dir, capsys, monkeypatch
):
    real = sources._open

    def no_such_split(res, split, problems):  # as a local folder without that split file
        if split == "Validation":
            raise DataError(Problem("data", None, f"no Validation.jsonl for split '{split}'"))
        return real(res, split, problems)

    monkeypatch.setattr(sources, "_open", no_such_split)
    monkeypatch.setattr(
        "t2t_mtl.evaluation.run_eval.load_for_inference",
        lambda *a, **k: pytest.fail("the model was loaded"),
    )
    assert main(["eval", "--run", str(run_dir), "--split", "Validation"]) == 2
    err = capsys.readouterr().err
    assert err.count("no Validation.jsonl for split 'Validation'") == 3 and "Traceback" not in err
    assert not (run_dir / "eval" / "Validation.json").exists()
