"""Looking inside the model: token tables, next-token distributions, perplexity, attention summaries, the logit
lens, embedding neighbours, and their matplotlib plots (Agg, no display). Sits above engine.model and
engine.generation (it takes a loaded Model); engine.cli and the server's inspection endpoints
(engine.serve.inspect_routes) import it, and it imports neither."""
