"""Benchmarks: this engine's backends side by side with transformers (and llama.cpp when installed)."""
