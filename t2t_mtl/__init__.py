"""t2t_mtl: instruction-format, text-to-text, multi-task fine-tuning.

The subpackages are the layers, lowest first (`LAYERS`). A module imports only from its own layer
or a lower one, and the data layers (`DATA_LAYERS`) never import torch, transformers, peft, trl,
accelerate or bitsandbytes, so `validate`, `preview` and `mix` start fast and run without them.
`tests/test_import_graph.py` reads both tuples and checks every module against them.
"""

__all__ = ["DATA_LAYERS", "HEAVY_PACKAGES", "LAYERS", "__version__"]

__version__ = "0.1.0"

# The one layer map: (subpackage, what it holds), lowest first.
LAYERS: tuple[tuple[str, str], ...] = (
    ("core", "errors, records, YAML with line numbers, run configs, atomic file writes"),
    (
        "tasks",
        "task template files: schema, sandboxed Jinja, sources, answer parsing, the catalogue",
    ),
    ("mixing", "temperature mixing: the deterministic resumable stream and the replay buffer"),
    ("runs", "the run folder: layout, writing its fixed parts, reading it back"),
    ("model", "models and tokenizers, prompt format, features and packing, generation"),
    ("evaluation", "metrics, per-task evaluation, evaluating run folders, reports"),
    ("inference", "prompting and predicting with a trained run, export"),
    ("training", "the training loop, one optimiser step, batching, losses, checkpoints, telemetry"),
    ("cli", "the t2t-mtl command-line verbs"),
)
DATA_LAYERS: tuple[str, ...] = ("core", "tasks", "mixing", "runs")
HEAVY_PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
)
