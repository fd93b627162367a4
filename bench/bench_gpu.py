"""GPU training throughput: tokens/s, MFU and peak memory of `trainer.train` at real model shapes.

    python bench/bench_gpu.py [DATA_DIR] [--variants all|NAME,...] [--warmup 3] [--steps 10]
        [--models-dir /tmp/t2t-bench-models] [--tokenizer DIR] [--tiny]
        [--mixed-precision bf16] [--lora-cast] [--set SECTION.KEY=VALUE ...] [--profile-steps 2]
        [--out bench/results/gpu.json] [--doc docs/benchmarks.md] [--no-doc | --doc-only]

No weights are downloaded: each model is built from its published *shape* (a transformers config
written out below) with random weights, saved once under --models-dir with the tokenizer of the
embedded SmolLM2 (--tokenizer, default: the embedded model's cached copy), and then loaded by the
product's own loader (`loading.load_model_and_tokenizer`: peft LoRA, or bitsandbytes NF4 + LoRA
for QLoRA). Random weights run the same kernels at the same cost as trained ones.

Shapes: Qwen2.5-1.5B (28 layers, hidden 1536, GQA 12/2 heads, MLP 8960, vocab 151,936), Qwen2.5-7B
(28 layers, hidden 3584, GQA 28/4, MLP 18,944, vocab 152,064) and t5-base (12+12 layers, d_model
768, d_ff 3072, 12 heads; vocab 49,152 = the tokenizer's, instead of t5's 32,128).

Every variant is one `trainer.train` run (the five real slices of DATA_DIR through the shipped
templates, mixed at T=2, lazily rendered and tokenised, collated with or without packing), in its own
child process so its CUDA peak memory is its own: --warmup steps, then --steps timed steps (CUDA
synchronised at each step end, so the data pipeline's time is inside the measurement). Counted per
timed step: real input tokens (padding excluded), padded slots, target tokens, and model FLOPs.
CUDA memory by phase (`PhaseMemory`, null without CUDA): allocated after / peak during the model
load (the trainer's `_setup_model`) and accelerate's prepare (`_setup_optimizer`), the peak within
each optimiser step (counters reset at its start; step 1 also allocates AdamW's state), and the
whole run's peaks. bench/gpu_check.sh runs the issue-#17 variants on a lent GPU in one call.

MFU = model FLOPs per second / the GPU's dense bf16 peak (989.4 TFLOP/s for an H100 SXM; --peak to
override). Model FLOPs are the work the LoRA step needs, per example of length s: 4·N_body·s for the
frozen linear layers (forward + input gradient; a frozen weight needs no weight gradient), 4·V·h per
*target* token for the LM head (our step computes logits at target positions only), 6·N_lora·s for
the adapters and 6·L·d·s² for causal attention (3 × the forward's 2·L·d·s²; per example, so packing
earns nothing for attention it does not need). Activation recomputation (gradient checkpointing) is
not counted. The usual 6·N·tokens convention is reported beside it (MFU_6N), for comparison with
numbers quoted elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

SECTION = "## GPU training throughput"
H100_BF16_DENSE = 989.4e12  # datasheet, H100 SXM5, dense (no sparsity)

SHAPES = {
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
    },
    "t5-base": {
        "model_type": "t5",
        "d_model": 768,
        "d_ff": 3072,
        "d_kv": 64,
        "num_layers": 12,
        "num_decoder_layers": 12,
        "num_heads": 12,
        "vocab_size": 49152,
        "feed_forward_proj": "relu",
        "tie_word_embeddings": True,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
    },
}
# --tiny: the same code path at toy sizes (a CPU smoke test of this script)
TINY = {
    "qwen2.5-1.5b": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "qwen2.5-7b": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "t5-base": {
        "d_model": 64,
        "d_ff": 128,
        "d_kv": 16,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
    },
}


def _variant(shape, method, seq, packing, batch):
    return {"shape": shape, "method": method, "seq": seq, "packing": packing, "batch": batch}


VARIANTS = {
    "lora-1.5b-s1024-packed": _variant("qwen2.5-1.5b", "lora", 1024, "on", 64),
    "lora-1.5b-s1024-padded": _variant("qwen2.5-1.5b", "lora", 1024, "off", 64),
    "lora-1.5b-s2048-packed": _variant("qwen2.5-1.5b", "lora", 2048, "on", 64),
    "lora-1.5b-s2048-padded": _variant("qwen2.5-1.5b", "lora", 2048, "off", 64),
    "t5base-lora-s1024": _variant("t5-base", "lora", 1024, "off", 64),
    "qlora-7b-s1024-packed": _variant("qwen2.5-7b", "qlora", 1024, "on", 32),
    "qlora-7b-s1024-padded": _variant("qwen2.5-7b", "qlora", 1024, "off", 32),
    "qlora-7b-s2048-packed": _variant("qwen2.5-7b", "qlora", 2048, "on", 32),
    "qlora-7b-s2048-padded": _variant("qwen2.5-7b", "qlora", 2048, "off", 32),
}


# ------------------------------------------------------------------ models


def make_model(shape: str, folder: Path, tokenizer_dir: Path, tiny: bool) -> None:
    """Write `folder`: config + random bf16 weights of `shape` + the tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    spec = dict(SHAPES[shape])
    if tiny:
        spec.update(TINY[shape])
    kind = spec.pop("model_type")
    cfg = AutoConfig.for_model(kind, **spec)
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(
        device
    ):  # initialising 7.6 B weights on the GPU takes seconds, on a CPU minutes
        model = cls.from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():
        if (
            f.name.startswith(("tokenizer", "special_tokens", "chat_template"))
            or f.suffix == ".model"
        ):
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, folder)


def model_dir(models_dir: Path, shape: str, tiny: bool) -> Path:
    return models_dir / (shape + ("-tiny" if tiny else ""))


# ------------------------------------------------------------------ FLOPs


def flop_model(folder: Path, r: int) -> dict:
    """Counts for the FLOPs formula, read off a meta-device copy of the model (no memory used)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(folder)
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    with torch.device("meta"):
        model = (AutoModelForSeq2SeqLM if enc_dec else AutoModelForCausalLM).from_config(cfg)
    out = {
        "enc_dec": enc_dec,
        "body": 0,
        "enc": 0,
        "dec": 0,
        "cross_kv": 0,
        "lora": 0,
        "lora_enc": 0,
        "params": sum(p.numel() for p in model.parameters()),
    }
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        n = mod.weight.numel()
        lora = r * (mod.in_features + mod.out_features)
        if name.endswith("lm_head"):
            out["head"] = n
            continue
        if not enc_dec:
            out["body"] += n
            out["lora"] += lora
        elif name.startswith("encoder."):
            out["enc"] += n
            out["lora_enc"] += lora
        elif ".EncDecAttention.k" in name or ".EncDecAttention.v" in name:
            out["cross_kv"] += n  # applied to every *source* token in every decoder layer
            out["lora_enc"] += lora
        else:
            out["dec"] += n
            out["lora"] += lora
    if enc_dec:
        out.update(
            layers=cfg.num_layers,
            dec_layers=cfg.num_decoder_layers,
            d_attn=cfg.num_heads * cfg.d_kv,
        )
    else:
        out.update(
            layers=cfg.num_hidden_layers,
            d_attn=cfg.num_attention_heads
            * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        )
    out["head"] = out.get("head", 0)
    return out


def example_flops(fm: dict, src: int, tgt: int, targets: int) -> float:
    """Model FLOPs of one training example (see the module doc). Causal: src = all tokens, tgt unused."""
    if not fm["enc_dec"]:
        s = src
        return (
            4 * fm["body"] * s
            + 4 * fm["head"] * targets
            + 6 * fm["lora"] * s
            + 6 * fm["layers"] * fm["d_attn"] * s * s
        )
    s, t, d = src, tgt, fm["d_attn"]
    lin = 4 * (fm["enc"] + fm["cross_kv"]) * s + 4 * fm["dec"] * t + 4 * fm["head"] * targets
    lora = 6 * fm["lora_enc"] * s + 6 * fm["lora"] * t
    attn = 3 * (fm["layers"] * 4 * s * s * d + fm["dec_layers"] * (2 * t * t * d + 4 * s * t * d))
    return lin + lora + attn


# ------------------------------------------------------------------ child: one training run


def run_config(
    data_dir: Path,
    out_dir: Path,
    v: dict,
    folder: Path,
    steps: int,
    tiny: bool,
    overrides: tuple = (),
):
    """The default recipe (LoRA r16 all-linear, lr 3e-4, T=2) on the five real slices at this variant's shape."""
    from t2t_mtl.core.config import load_config

    data = common.default_recipe()
    data["tasks"] = common.slice_tasks(data_dir)
    data["output_dir"] = str(out_dir)
    data["model"].update(
        {"name": str(folder), "dtype": "bfloat16", "max_length": v["seq"], "max_target_length": 128}
    )
    if not tiny:
        data["model"]["attn_implementation"] = "sdpa"
    data["adapter"]["method"] = v["method"]
    data["train"].update(
        {
            "steps": steps,
            "batch_size": v["batch"],
            "packing": v["packing"],
            "save_steps": 10**6,
            "resume": "never",
            "gradient_checkpointing": True,
            "report_to": "none",
            "logging_steps": 10**6,
        }
    )
    data["eval"]["every_steps"] = 0
    for item in overrides:  # --set section.key=value (an ablation on top of the recipe)
        import yaml

        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    return load_config(data=data)


def child_run(spec: dict) -> dict:
    """One `trainer.train` run; per-step times, tokens, FLOPs and CUDA peak memory."""
    import torch

    from t2t_mtl.model import features
    from t2t_mtl.training import optimizer_step, trainer

    v, cuda = spec["variant"], torch.cuda.is_available()
    if spec.get("mixed_precision"):  # what `accelerate launch --mixed_precision X` sets
        os.environ["ACCELERATE_MIXED_PRECISION"] = spec["mixed_precision"]

    folder = Path(spec["folder"])
    fm = flop_model(folder, common.default_recipe()["adapter"]["r"])
    lengths: list[
        list[tuple[int, int, int]]
    ] = []  # per collated micro-batch: (source, target, targets) per example

    def record(collate_cls):
        original = collate_cls.__call__

        def call(self, feats):
            lengths.append(
                [
                    (
                        len(f["input_ids"]),
                        len(f["labels"]),
                        sum(1 for x in f["labels"] if x != features.IGNORE_INDEX),
                    )
                    for f in feats
                ]
            )
            return original(self, feats)

        collate_cls.__call__ = call

    record(features.CausalCollator)
    record(features.Seq2SeqCollator)
    packing_used = []
    orig_check = features.packing_check

    def check(*args, **kw):  # the trainer's packing check (train.packing auto/on)
        before = len(lengths)
        ok, why = orig_check(*args, **kw)
        del lengths[before:]  # the check's own two-example batches are not training data
        packing_used.append(ok)
        return ok, why

    features.packing_check = check
    steps: list[dict] = []
    orig_run = optimizer_step.StepRunner.run
    if spec.get(
        "lora_cast"
    ):  # ablation: peft's float32 input copies kept under autocast (before 2026-11-24)
        orig_init = optimizer_step.StepRunner.__init__

        def init(self, *args, **kw):
            orig_init(self, *args, **kw)
            self.uncast = []

        optimizer_step.StepRunner.__init__ = init

    def counted(self, window, *args, **kw):
        if cuda:
            torch.cuda.synchronize()
        # fold the time since the last mark into the run's peaks; before step 1 that is the
        # packing check and data set-up after prepare
        mem.mark(None if steps else "before_steps")
        t0 = time.perf_counter()
        res = orig_run(self, window, *args, **kw)
        if cuda:
            torch.cuda.synchronize()
        compute_s = time.perf_counter() - t0
        step_peak = mem.mark(None)[1]  # this step's peak (forward, backward, optimiser step)
        micro = [lengths.pop(0) for _ in window.micro]
        ex = [e for m in micro for e in m]
        causal = not fm["enc_dec"]
        steps.append(
            {
                "compute_s": compute_s,
                "input_tokens": sum(s for s, _, _ in ex)
                if causal
                else sum(s + t for s, t, _ in ex),
                "target_tokens": float(res.tokens.sum()),
                "slots": sum(
                    m["input_ids"].numel() + (0 if causal else m["labels"].numel())
                    for m in window.micro
                ),
                "rows": sum(m["input_ids"].shape[0] for m in window.micro),
                "flops": sum(example_flops(fm, s, t, k) for s, t, k in ex),
                "flops_6n": 6
                * fm["params"]
                * (sum(s for s, _, _ in ex) if causal else sum(s + t for s, t, _ in ex)),
                "loss": res.objective,
                "peak_gib": step_peak,
            }
        )
        return res

    ends: list[float] = []
    prof: dict = {}
    first_prof = spec["warmup"] + spec["steps"]  # profiled steps come after the timed ones

    def on_step(step, info):
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        n = len(ends)
        if spec.get("profile_steps") and n == first_prof:
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else []
            )
            prof["p"] = torch.profiler.profile(activities=acts)
            prof["p"].__enter__()
        elif "p" in prof and n == first_prof + spec["profile_steps"]:
            prof["p"].__exit__(None, None, None)
            prof["rows"] = profile_rows(
                prof.pop("p"), spec["profile_steps"], ends[-1] - ends[first_prof - 1]
            )

    total = (
        spec["warmup"] + spec["steps"] + spec.get("profile_steps", 0) + 1
    )  # last step: final save, untimed
    optimizer_step.StepRunner.run = counted
    mem = PhaseMemory(cuda)
    orig_model, orig_opt = trainer._Trainer._setup_model, trainer._Trainer._setup_optimizer

    def setup_model(self):  # load: the product's loader (QLoRA quantises onto the GPU here)
        model = orig_model(self)
        mem.mark("load")
        return model

    def setup_optimizer(self, model):  # prepare: accelerate moves the model and wraps the optimiser
        orig_opt(self, model)
        mem.mark("prepare")

    trainer._Trainer._setup_model = setup_model
    trainer._Trainer._setup_optimizer = setup_optimizer
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        cfg = run_config(
            Path(spec["data_dir"]),
            Path(tmp) / "run",
            v,
            folder,
            total,
            spec["tiny"],
            tuple(spec.get("set", ())),
        )
        t0 = time.perf_counter()
        trainer.train(cfg, eval_fn=None, on_step=on_step)
        wall = time.perf_counter() - t0
    w = spec["warmup"]
    timed, seconds = steps[w : w + spec["steps"]], ends[w + spec["steps"] - 1] - ends[w - 1]
    tot = {
        k: sum(s[k] for s in timed)
        for k in ("input_tokens", "target_tokens", "slots", "flops", "flops_6n", "compute_s")
    }
    peak = spec["peak_flops"]
    res = {
        "seconds": round(seconds, 3),
        "steps": len(timed),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tot["input_tokens"] / seconds, 1),
        "target_tokens_per_s": round(tot["target_tokens"] / seconds, 1),
        "slots_per_s": round(tot["slots"] / seconds, 1),
        "padding_efficiency": round(tot["input_tokens"] / max(tot["slots"], 1), 3),
        "tokens_per_step": round(tot["input_tokens"] / len(timed), 1),
        "rows_per_step": round(sum(s["rows"] for s in timed) / len(timed), 1),
        "tflops": round(tot["flops"] / seconds / 1e12, 2),
        "mfu": round(tot["flops"] / seconds / peak, 4),
        "mfu_6n": round(tot["flops_6n"] / seconds / peak, 4),
        "step_s": round(seconds / len(timed), 3),
        "outside_step_share": round(
            1 - tot["compute_s"] / seconds, 3
        ),  # data pipeline + hooks between steps
        "losses": [round(s["loss"], 4) for s in steps],
        "packing_applied": bool(packing_used and packing_used[-1]),
        "params": fm["params"],
        "profile": prof.get("rows"),
    }
    mem.mark(None)  # the last step's checkpoint save, into the whole-run peaks
    res.update(mem.fields([s["peak_gib"] for s in steps], w, spec["steps"]))
    return res


class PhaseMemory:
    """CUDA memory by phase of one run (GiB): `mark(phase)` reads the memory allocated now and the
    peak since the previous mark, keeps them under `phase`, and resets the peak counters; the
    whole-run peaks are the maxima over all marks. Without CUDA every reading is None."""

    def __init__(self, cuda: bool):
        self.cuda, self.phases, self.peak, self.reserved = cuda, {}, None, None
        if cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def mark(self, phase: str | None) -> tuple[float | None, float | None]:
        if not self.cuda:
            out = (None, None)
        else:
            import torch

            torch.cuda.synchronize()
            gib = 2**30
            out = (
                round(torch.cuda.memory_allocated() / gib, 2),
                round(torch.cuda.max_memory_allocated() / gib, 2),
            )
            reserved = round(torch.cuda.max_memory_reserved() / gib, 2)
            self.peak = max(self.peak or 0.0, out[1])
            self.reserved = max(self.reserved or 0.0, reserved)
            torch.cuda.reset_peak_memory_stats()
        if phase:
            self.phases[phase] = out
        return out

    def fields(self, step_peaks: list, warmup: int, timed: int) -> dict:
        """The result's memory keys (None without CUDA); step peaks: first = step 1 (it allocates
        the optimiser state), median and max over the timed steps."""
        ph = {k: self.phases.get(k, (None, None)) for k in ("load", "prepare", "before_steps")}
        t = [x for x in step_peaks[warmup : warmup + timed] if x is not None]
        return {
            "mem_load_gib": ph["load"][0],
            "mem_load_peak_gib": ph["load"][1],
            "mem_prepare_gib": ph["prepare"][0],
            "mem_prepare_peak_gib": ph["prepare"][1],
            "mem_before_steps_peak_gib": ph["before_steps"][1],
            "step_peak_first_gib": step_peaks[0] if step_peaks else None,
            "step_peak_median_gib": round(statistics.median(t), 2) if t else None,
            "step_peak_max_gib": max(t) if t else None,
            "step_peaks_gib": step_peaks if self.cuda else None,
            "peak_alloc_gib": self.peak,
            "peak_reserved_gib": self.reserved,
            "mem_phases": sorted(self.phases),  # the hooks that fired (with or without CUDA)
        }


def profile_rows(p, steps: int, wall: float, top: int = 14) -> dict:
    """Top operators by self GPU time and by self CPU time (ms per step), and GPU busy time per step."""

    def dev(e):
        return (
            getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        )

    evs = [e for e in p.key_averages() if not e.key.startswith("ProfilerStep")]
    busy = sum(dev(e) for e in evs) / 1e3 / steps

    def rows(key):
        return [
            {
                "op": e.key[:70],
                "gpu_ms": round(dev(e) / 1e3 / steps, 2),
                "cpu_ms": round(e.self_cpu_time_total / 1e3 / steps, 2),
                "calls": round(e.count / steps),
            }
            for e in sorted(evs, key=key)[:top]
        ]

    return {
        "wall_ms_per_step": round(wall * 1e3 / steps, 1),
        "gpu_busy_ms_per_step": round(busy, 1),
        "kernels_per_step": round(sum(e.count for e in evs if dev(e) > 0) / steps),
        "by_gpu": rows(lambda e: -dev(e)),
        "by_cpu": rows(lambda e: -e.self_cpu_time_total),
    }


def matmul_peak() -> float | None:
    """Measured bf16 matmul rate (FLOP/s) of this GPU: 8192³ products, median of 20 after warm-up."""
    import torch

    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2]


def child_main(kind: str, spec: dict) -> int:
    if kind == "make":
        make_model(spec["shape"], Path(spec["folder"]), Path(spec["tokenizer"]), spec["tiny"])
        out = {"ok": True}
    elif kind == "peak":
        out = {"matmul_flops": matmul_peak()}
    else:
        out = child_run(spec)
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def run_child(kind: str, spec: dict) -> dict:
    """Run one child process; its result dict, or {"error": last lines of its output}."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode == 0 and Path(spec["result"]).is_file():
            out = json.loads(Path(spec["result"]).read_text())
            # keep what the run said about itself (e.g. why the packing probe refused a model)
            notes = [
                ln.strip()
                for ln in proc.stdout.splitlines()
                if "packing" in ln.lower() or "warn" in ln.lower()
            ]
            return {**out, "log_notes": notes[-10:]} if kind == "run" else out
        tail = proc.stdout.strip().splitlines()[-12:]
        oom = any("out of memory" in line.lower() for line in tail)
        return {"error": "out of memory" if oom else "\n".join(tail)}


# ------------------------------------------------------------------ report


def _gib(x) -> str:
    """A memory reading in GiB; '–' when not measured (no CUDA)."""
    return "–" if x is None else f"{x:.2f}"


def memory_cells(r: dict) -> str:
    """The phase columns of `table`: load and prepare (allocated after / peak during), the step
    peaks (first / median / max) and the whole run's peaks."""
    load = f"{_gib(r.get('mem_load_gib'))} / {_gib(r.get('mem_load_peak_gib'))}"
    prep = f"{_gib(r.get('mem_prepare_gib'))} / {_gib(r.get('mem_prepare_peak_gib'))}"
    step = " / ".join(_gib(r.get(f"step_peak_{k}_gib")) for k in ("first", "median", "max"))
    return (
        f"{load} | {prep} | {step} | {_gib(r.get('peak_alloc_gib'))} | "
        f"{_gib(r.get('peak_reserved_gib'))} |"
    )


def table(results: dict) -> str:
    rows = [
        "| variant | model | method | seq | packing | records/step | tokens/step | padding eff. | step s | "
        "tokens/s | TFLOP/s | MFU | MFU (6N) | outside step | load GiB (after / peak) | "
        "prepare GiB (after / peak) | step peak GiB (first / median / max) | peak alloc GiB | "
        "peak reserved GiB |",
        "|---|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in results.items():
        v = r["variant"]
        if "error" in r:
            rows.append(
                f"| {name} | {v['shape']} | {v['method']} | {v['seq']} | {v['packing']} | {v['batch']} | "
                f"{r['error'].splitlines()[-1][:80]} |" + " |" * 12
            )
            continue
        pk = (
            ("on" if r["packing_applied"] else "off (probe refused)")
            if v["packing"] == "on"
            else ("–" if v["shape"].startswith("t5") else "off")
        )
        rows.append(
            f"| {name} | {v['shape']} | {v['method']} | {v['seq']} | {pk} | {v['batch']} | "
            f"{r['tokens_per_step']:,.0f} | {r['padding_efficiency']:.2f} | {r['step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {100 * r['mfu']:.1f} % | "
            f"{100 * r['mfu_6n']:.1f} % | {100 * r['outside_step_share']:.0f} % | "
            + memory_cells(r)
        )
    return "\n".join(rows)


# Issue #17's targets, against the H100 run of 2026-11-24 (docs/benchmarks.md): QLoRA-7B 2,000
# tokens/s at 24.5 GiB, LoRA-1.5B packed 6.2 % MFU, t5-base 6,637 tokens/s. (variant, what, test)
TARGETS = (
    (
        "qlora-7b-s1024-packed",
        "peak alloc ≤ 10 GiB",
        lambda r: (r.get("peak_alloc_gib") or 1e9) <= 10,
    ),
    ("qlora-7b-s1024-packed", "≥ 2× 2,000 tokens/s", lambda r: r["tokens_per_s"] >= 4000),
    ("lora-1.5b-s1024-packed", "MFU ≥ 25 %", lambda r: r["mfu"] >= 0.25),
    ("t5base-lora-s1024", "≥ 3× 6,637 tokens/s", lambda r: r["tokens_per_s"] >= 3 * 6637),
)


def targets(results: dict) -> list[str]:
    """One line per issue-#17 target whose variant is in `results`: met, not met, or failed."""
    out = []
    for name, what, ok in TARGETS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            verdict = f"run failed ({r['error'].splitlines()[-1][:60]})"
        else:
            verdict = "met" if ok(r) else "not met"
            verdict += (
                f" ({r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f} %, "
                f"peak {_gib(r.get('peak_alloc_gib'))} GiB)"
            )
        out.append(f"{name}: {what}: {verdict}")
    return out


def ratios(results: dict) -> list[str]:
    """packed / padded tokens/s for each (model, seq) pair measured in this run."""
    out = []
    for name, r in results.items():
        if not name.endswith("-packed") or "error" in r:
            continue
        other = results.get(name[: -len("packed")] + "padded")
        if other and "error" not in other and not r["packing_applied"]:
            out.append(
                f"{name[: -len('-packed')]}: no comparison — the packing probe refused this model, so "
                "the 'packed' run trained unpacked"
            )
        elif other and "error" not in other:
            out.append(
                f"{name[: -len('-packed')]}: packed/padded tokens/s = "
                f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}×, peak memory "
                f"{_gib(r.get('peak_alloc_gib'))} vs {_gib(other.get('peak_alloc_gib'))} GiB"
            )
    return out


def section_body(meta: dict, results: dict) -> str:
    m = meta["machine"]
    peak = meta.get("matmul_tflops")
    lines = [
        "Command (on a GPU machine; DATA_DIR = the real-data folder):",
        "",
        "    python bench/bench_gpu.py ../shared/data/real --out bench/results/gpu.json",
        "",
        f"GPU: {m.get('cuda') or 'none'}; torch {m.get('torch')}, transformers {m.get('transformers')}, "
        f"peft {m.get('peft')}, bitsandbytes {meta.get('bitsandbytes')}; {meta['steps']} timed steps after "
        f"{meta['warmup']} warm-up steps per variant; measured {m.get('date')}. Measured bf16 matmul rate "
        f"(8192³): {f'{peak:.0f} TFLOP/s' if peak else '–'}."
        + (
            f" Run with `--mixed-precision {meta['mixed_precision']}` (autocast as accelerate launch sets it)."
            if meta.get("mixed_precision")
            else ""
        ),
        "",
        "Models have the published shapes with random weights (no download; see the script's doc); the tokenizer "
        "is the embedded SmolLM2's. Every run is the product's `trainer.train`: the five real slices through "
        "the shipped templates, LoRA r=16 on all linear layers (QLoRA: NF4 + double quantisation, bf16 compute), "
        "gradient checkpointing, SDPA attention, bf16 weights. *tokens/s* counts real prompt + answer tokens "
        "(padding excluded); *padding eff.* = real tokens / token slots fed to the model; *MFU* = model FLOPs "
        f"(LoRA step: 4·N per token for frozen layers, LM head on target tokens only, attention per example) / "
        f"{meta['peak_flops'] / 1e12:.1f} TFLOP/s (dense bf16 datasheet peak); *MFU (6N)* uses the common "
        "6·N·tokens count instead; *outside step* = share of wall time spent between optimiser steps (data "
        "pipeline: render, tokenise, collate).",
        "",
        "Memory (CUDA allocator, GiB) by phase of the run: *load* = after the product's loader returns, "
        "before accelerate's prepare (QLoRA's NF4 weights are quantised straight onto the GPU here; a "
        "LoRA model is still on the CPU, so ≈0), allocated after / peak during; *prepare* = after "
        "`accelerator.prepare` (model on the GPU, optimiser wrapped; AdamW's state does not exist yet), "
        "allocated after / peak during; *step peak* = the peak allocated within one optimiser step "
        "(forward, backward, optimiser update; counters reset at each step's start): step 1 (a warm-up "
        "step, which also allocates AdamW's state), then the median and the max over the timed steps; "
        "*peak alloc / reserved* = the whole run's peaks, including the packing check between prepare "
        "and step 1 (`mem_before_steps_peak_gib` in the JSON) and the final checkpoint save.",
        "",
        table(results),
        "",
    ]
    rat = ratios(results)
    if rat:
        lines += ["Packing, side by side in this run:", ""] + [f"- {x}" for x in rat] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data_dir", nargs="?", default=str(common.DEFAULT_DATA))
    p.add_argument(
        "--variants", default="all", help="all, or a comma list of: " + ", ".join(VARIANTS)
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe setting in every variant (an ablation), e.g. adapter.dropout=0",
    )
    p.add_argument(
        "--mixed-precision",
        choices=["no", "bf16"],
        default=None,
        help="as accelerate launch --mixed_precision (autocast around the forward)",
    )
    p.add_argument(
        "--lora-cast",
        action="store_true",
        help="ablation: keep peft's float32 copies of LoRA inputs under autocast (the old behaviour)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="steps under torch.profiler after the timed ones",
    )
    p.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "t2t-bench-models"))
    p.add_argument(
        "--tokenizer",
        default=None,
        help="folder with tokenizer files (default: the embedded model's copy)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="toy sizes of every shape (a smoke test; runs on a CPU)"
    )
    p.add_argument("--peak", type=float, default=H100_BF16_DENSE, help="peak FLOP/s for MFU")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-doc", action="store_true")
    g.add_argument("--doc-only", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(a.child, json.loads(a.spec))
    out = Path(a.out)
    if a.doc_only:
        data = json.loads(out.read_text(encoding="utf-8"))
        common.update_doc(Path(a.doc), SECTION, section_body(data["meta"], data["results"]))
        return 0
    names = (
        list(VARIANTS)
        if a.variants == "all"
        else [n.strip() for n in a.variants.split(",") if n.strip()]
    )
    bad = [n for n in names if n not in VARIANTS]
    data_dir = Path(a.data_dir)
    errors = [
        f"error: --variants: unknown variant {n!r} (known: {', '.join(VARIANTS)})" for n in bad
    ]
    errors += common.check_data_dir(data_dir, [f for _, f in common.SLICES])
    if a.tokenizer is None:
        from t2t_mtl.model import loading

        a.tokenizer = str(loading.embedded_copy())
    if not Path(a.tokenizer, "tokenizer_config.json").is_file():
        errors.append(f"error: --tokenizer {a.tokenizer}: no tokenizer_config.json there")
    if errors:
        return common.report_errors(errors)
    import importlib.metadata as md

    try:
        bnb = md.version("bitsandbytes")
    except md.PackageNotFoundError:
        bnb = None
    meta = {
        "machine": common.machine(),
        "bitsandbytes": bnb,
        "warmup": a.warmup,
        "steps": a.steps,
        "set": a.set,
        "mixed_precision": a.mixed_precision,
        "lora_cast": a.lora_cast,
        "peak_flops": a.peak,
        "tiny": a.tiny,
    }
    peak = run_child("peak", {})
    meta["matmul_tflops"] = (
        round(peak["matmul_flops"] / 1e12, 1) if peak.get("matmul_flops") else None
    )
    results: dict = {}
    if (
        out.is_file()
    ):  # keep variants measured by an earlier invocation (one variant at a time fits a short lease)
        old = json.loads(out.read_text(encoding="utf-8"))
        if old.get("meta", {}).get("tiny") == a.tiny:
            results = {k: v for k, v in old.get("results", {}).items() if k not in names}
    models = Path(a.models_dir)
    models.mkdir(parents=True, exist_ok=True)
    for name in names:
        v = VARIANTS[name]
        folder = model_dir(models, v["shape"], a.tiny)
        if not folder.is_dir():
            t0 = time.perf_counter()
            made = run_child(
                "make",
                {
                    "shape": v["shape"],
                    "folder": str(folder),
                    "tokenizer": a.tokenizer,
                    "tiny": a.tiny,
                },
            )
            print(
                f"built {folder} in {time.perf_counter() - t0:.0f} s {made.get('error', '')}",
                flush=True,
            )
        t0 = time.perf_counter()
        r = run_child(
            "run",
            {
                "variant": v,
                "folder": str(folder),
                "data_dir": str(data_dir),
                "warmup": a.warmup,
                "steps": a.steps,
                "tiny": a.tiny,
                "peak_flops": a.peak,
                "profile_steps": a.profile_steps,
                "set": a.set,
                "mixed_precision": a.mixed_precision,
                "lora_cast": a.lora_cast,
            },
        )
        results[name] = {"variant": v, **r}
        print(
            f"{name}: {time.perf_counter() - t0:.0f} s "
            + (
                r["error"]
                if "error" in r
                else f"{r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f} %, "
                f"peak {r.get('peak_alloc_gib')} GiB"
            ),
            flush=True,
        )
        common.write_json(
            out, {"meta": meta, "results": results}
        )  # after every variant: a cut run keeps them
    print(table({n: results[n] for n in results}))
    for line in targets(results):
        print("target " + line)
    for name in names:
        pr = results[name].get("profile")
        if pr:
            print(
                f"\n{name}: wall {pr['wall_ms_per_step']} ms/step, GPU busy {pr['gpu_busy_ms_per_step']} ms/step, "
                f"{pr['kernels_per_step']} kernels/step"
            )
            for label in ("by_gpu", "by_cpu"):
                print(
                    f"  {label}: "
                    + "; ".join(
                        f"{r['op']} {r['gpu_ms']}/{r['cpu_ms']} ms x{r['calls']}"
                        for r in pr[label][:10]
                    )
                )
    if not a.no_doc and not a.tiny:
        common.update_doc(Path(a.doc), SECTION, section_body(meta, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
