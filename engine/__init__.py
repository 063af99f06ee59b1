"""tinyllama engine: a from-scratch NumPy (and optional Triton) runtime for Llama-architecture checkpoints."""
from engine.blas import choose_openblas_kernel

choose_openblas_kernel()  # before anything imports NumPy

# ruff: noqa: E402
from engine.config import ModelConfig
from engine.errors import ContextOverflowError, EngineError
from engine.model import Model, load_model
from weights.errors import CheckpointError

__all__ = ["load_model", "Model", "ModelConfig", "CheckpointError", "EngineError", "ContextOverflowError"]
