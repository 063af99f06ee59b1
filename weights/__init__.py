"""Where checkpoints come from: Hub download, safetensors reading, checkpoint validation.

This package knows files, not math, and imports nothing else of this project.
"""
from weights.errors import CheckpointError
from weights.hub import DEFAULT_MODEL, resolve_model_folder
from weights.safetensors_file import SafetensorsFile
from weights.checkpoint import Checkpoint, open_checkpoint

__all__ = ["CheckpointError", "DEFAULT_MODEL", "resolve_model_folder", "SafetensorsFile", "Checkpoint", "open_checkpoint"]
