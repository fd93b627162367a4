"""Tasks: template files (schema, sandboxed Jinja, includes), their sources, answer parsing and the catalogue. No torch."""
