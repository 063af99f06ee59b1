"""Text: the tokenizer, the chat template, stop strings. Knows nothing of the model math: it imports no other room
of engine (not runtime, generation or cli)."""
