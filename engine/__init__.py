"""tinyllama engine: a from-scratch NumPy (and optional Triton) runtime for Llama-architecture checkpoints."""
from engine.runtime.blas import choose_openblas_kernel

choose_openblas_kernel()  # before anything imports NumPy

# ruff: noqa: E402
from engine.compare import ComparisonReport, compare_with_transformers
from engine.config import ModelConfig
from engine.errors import ContextOverflowError, EngineError
from engine.generation.scheduler import Scheduler
from engine.generation.state import GenerationResult, TokenEvent
from engine.model import Model, load_model
from weights.errors import CheckpointError

__all__ = ["load_model", "Model", "ModelConfig", "Scheduler", "GenerationResult", "TokenEvent", "CheckpointError",
           "EngineError", "ContextOverflowError", "compare_with_transformers", "ComparisonReport"]
