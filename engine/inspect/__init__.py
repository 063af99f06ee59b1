"""Looking inside the model: token tables, next-token distributions, perplexity, attention summaries, the logit
lens, embedding neighbours, and their matplotlib plots (Agg, no display). Sits above engine.model and
engine.generation (it takes a loaded Model); only engine.cli imports it, and it never imports engine.cli."""
