"""Every shipped run config and accelerate config is valid (no model loading, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from t2t_mtl.core.config import load_config
from t2t_mtl.tasks import catalogue

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((REPO / "launch" / "configs").glob("*.yaml"))
ACCEL_CONFIGS = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name repository paths (data, ../shared) from the project root
    cfg = load_config(path)
    problems = catalogue.check_config(cfg)
    if (
        any("not found: ../shared" in p.message for p in problems)
        and not (REPO.parent / "shared").is_dir()
    ):
        pytest.skip("config reads the shared real-data slices, absent here")
    assert problems == [], "\n".join(p.format() for p in problems)
    assert cfg.stage_list() and all(s.steps > 0 for s in cfg.stage_list())


def test_training_configs_exist_and_default_covers_every_shipped_task():
    names = {p.name for p in RUN_CONFIGS}
    assert {"default.yaml", "qlora_qwen.yaml", "t5.yaml", "tiny_cpu.yaml"} <= names
    default = load_config(REPO / "launch" / "configs" / "default.yaml")
    shipped = set(catalogue.find_task_files())
    assert {t.template for t in default.tasks} == shipped
    assert default.model.name.startswith("embedded:") and all(
        t.source is None for t in default.tasks
    )
    qwen = load_config(REPO / "launch" / "configs" / "qlora_qwen.yaml")
    assert qwen.adapter.method == "qlora" and "/" in qwen.model.name
    t5 = load_config(REPO / "launch" / "configs" / "t5.yaml")
    assert t5.model.family == "seq2seq" and "t5" in t5.model.name


@pytest.mark.parametrize("path", ACCEL_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    cfg = load_config_from_file(str(path))  # accelerate's own parser (rejects unknown keys)
    assert cfg.distributed_type == raw["distributed_type"]
    if raw["distributed_type"] == "DEEPSPEED":
        assert (
            raw["deepspeed_config"]["gradient_accumulation_steps"] == "auto"
        )  # taken from train.grad_accum


def test_all_accelerate_setups_are_shipped():
    assert {p.stem for p in ACCEL_CONFIGS} == {
        "single_gpu",
        "ddp",
        "fsdp",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "cpu_ddp",
        "cpu_fsdp",
    }


def test_the_documented_words_work_unquoted_in_a_file_and_as_overrides(tmp_path):
    """YAML 1.1 reads on/off/yes/no as booleans: `packing: off` in a file or `train.mixed_precision=no`
    on the command line must still mean the documented choice, not fail as "invalid value False"."""
    from t2t_mtl.core.config import load_config

    base = REPO / "launch" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(base, ["train.packing=off", "train.mixed_precision=no"])
    assert (cfg.train.packing, cfg.train.mixed_precision) == ("off", "no")
    assert load_config(base, ["train.packing=on"]).train.packing == "on"
    text = base.read_text(encoding="utf-8").replace(
        "train:\n", "train:\n  packing: off\n  mixed_precision: no\n", 1
    )
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.packing, cfg.train.mixed_precision) == ("off", "no")
