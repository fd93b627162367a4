"""t2t_mtl: instruction-format, text-to-text, multi-task fine-tuning.

Layers (imports only go downward; a test checks it):
  0  errors, records
  1  config, templates, sources, prompt_format, parsing
  2  tasks, mixing, replay, metrics
  3  features, modeling
  4  training, evaluation, inference
  5  cli
Layers 0-2 never import torch / transformers / peft.
"""

__version__ = "0.1.0"
