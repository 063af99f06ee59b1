"""The `tinyllama` command: argument parsing (main), shared loading and error helpers (common), one module per
subcommand. Sits on top of the house: it may import anything in engine, weights and bench; nothing imports it."""
from engine.cli.main import main

__all__ = ["main"]
