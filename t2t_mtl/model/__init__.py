"""Models: loading (embedded, hub, LoRA/QLoRA), the prompt format, features/packing/collators, generation."""
