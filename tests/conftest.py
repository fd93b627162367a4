"""Shared pytest fixtures: project paths and the optional real-data slices (keep this file small)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `train.mixed_precision: auto` trains in bf16 on CPUs with bf16 matrix units: keep the tests'
# runs in float32 whatever the machine (subprocesses inherit it); tests of the rule set it themselves.
os.environ.setdefault("T2T_MTL_CPU_BF16", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
REAL_DATA = (
    REPO_ROOT.parent / "shared" / "data" / "real"
)  # read-only slices; absent on user machines


@pytest.fixture
def repo_root() -> Path:
    """The project root (parent of the t2t_mtl package)."""
    return REPO_ROOT


@pytest.fixture
def fixtures_dir() -> Path:
    """tests/fixtures: small templates and data written for the tests."""
    return FIXTURES


@pytest.fixture
def real_data_dir() -> Path:
    """/work/shared/data/real (or the same place relative to the repo); skips the test when absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data slices not found at {REAL_DATA}")
    return REAL_DATA


# --- tiny local models (tests/tiny_models.py), built once per test session ---------------


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    """Session folder holding the tiny models below."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_causal_dir(tiny_models_root) -> Path:
    """Folder of a tiny Llama-style causal LM with a ChatML (SmolLM2) chat-template tokenizer."""
    from tiny_models import tiny_causal

    return tiny_causal(tiny_models_root)


@pytest.fixture(scope="session")
def tiny_t5_dir(tiny_models_root) -> Path:
    """Folder of a tiny T5 with a SentencePiece tokenizer trained in the test session."""
    from tiny_models import tiny_t5

    return tiny_t5(tiny_models_root)


@pytest.fixture(scope="module")
def causal(tiny_causal_dir):
    """(model, tokenizer, chat PromptFormat) of the tiny causal model with larger random weights
    (its random init answers "\n\n..." everywhere; these give varied text), one per test module."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from t2t_mtl.model.prompt_format import PromptFormat

    tok = AutoTokenizer.from_pretrained(tiny_causal_dir)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_dir).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, tok, PromptFormat.for_tokenizer(tok, "causal")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several threads spin-wait badly when the CPU is shared.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch  # here, not at the top: the data-layer tests never load torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
