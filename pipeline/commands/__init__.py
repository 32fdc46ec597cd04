"""CLI command groups, one module per pipeline stage; each exposes ``register(app)``."""
