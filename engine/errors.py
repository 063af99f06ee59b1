"""Errors a user can cause at run time (the checkpoint's own errors are weights.CheckpointError)."""


class EngineError(Exception):
    """A request the engine refuses: the message is one line for the user."""


class ContextOverflowError(EngineError):
    """A sequence would grow past the model's context window (max_position_embeddings)."""
