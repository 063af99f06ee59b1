"""`tinyllama serve` as replicas on Ray Serve: one deployment whose replicas each hold a loaded model, its serving loop
and prefix cache and run the same FastAPI app as `tinyllama serve` (engine.serve.app), behind a thin ingress
deployment that reads each request's prompt as token ids so that a request router (router.py, Ray Serve's
RequestRouter API) can send a conversation's next turn to the replica holding its prefix.

    settings.py    ClusterSettings: the one schema of a cluster (CLI flags and `serve run` config args)
    routing.py     a request's prompt -> the chained digests of its prefix-cache blocks (no Ray)
    affinity.py    which replica holds the longest prefix of a request, and when load wins (no Ray)
    forwarding.py  an HTTP request carried into an in-process ASGI app, its response carried back (no Ray)
    ingress.py     the ingress ASGI app: body -> routing keys -> a replica; a replica's death -> 503 (no Ray)
    cluster_metrics.py  every replica's /metrics merged, labelled by replica (no Ray)
    router.py      the RequestRouter subclasses (imports Ray)
    deployment.py  the Ray Serve deployments and the application builder (imports Ray)
    local.py       a local Ray instance on 127.0.0.1, and `tinyllama serve --replicas N` on it (imports Ray lazily)

Ray is imported only by router.py, deployment.py and inside local.py's functions: the engine and the single server
work without it (`pip install '.[cluster]'` adds it).
"""
