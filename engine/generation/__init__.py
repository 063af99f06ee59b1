"""Generation above the backend seam: sampling, per-sequence state and results, the continuous-batching scheduler,
speculative drafts, chat sessions. Uses runtime and text; never imports engine.model, engine.cli or a server: the
model is passed in."""
