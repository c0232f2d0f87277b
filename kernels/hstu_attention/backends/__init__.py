"""The attention backends, one module or package each; `registry.py` lists them. Each ends with one
`BACKEND = base.Backend(...)` declaration and imports only the shared modules (`common`, `masks`, `scores`,
`config`, `base`) and its own files."""
