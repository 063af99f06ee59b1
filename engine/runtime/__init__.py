"""The NumPy model: layers, rotary tables, the KV cache, weights in their runtime layout, the batch seam
(SequenceStep), the NumPy backend, BLAS choice and our compiled kernels (native/). Knows nothing of text, sampling,
generation, the CLI or HTTP: it imports only engine.config, engine.errors and weights."""
