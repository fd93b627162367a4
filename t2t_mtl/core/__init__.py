"""Foundations shared by every layer: problems and errors, records, YAML with key lines, run configs, atomic writes. No torch."""
