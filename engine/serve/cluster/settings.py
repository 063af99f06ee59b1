"""ClusterSettings: everything a cluster of `tinyllama serve` replicas is built from, in one flat schema.

The same fields come from `tinyllama serve --replicas N` (engine.cli.serve maps its flags onto them) and from the
`args:` of a `serve run` / `serve deploy` config file (engine.serve.cluster.deployment:app_builder), so the two ways
of starting a cluster cannot drift apart. Plain data (picklable, JSON-able): Ray hands it to every replica.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from engine.errors import EngineError
from engine.generation.serving import DEFAULT_PREFIX_CACHE_MB
from engine.inspect.embeddings import DEFAULT_POOLING, POOLINGS
from engine.generation.speculative import DRAFT_CHOICES
from engine.runtime.trace import TRACE_MEMORY_LIMIT
from engine.runtime.weights import WEIGHTS_DTYPE_CHOICES
from engine.text.chat_templates import resolve_chat_template
from weights.gguf_file import is_gguf_path
from weights.hub import DEFAULT_MODEL, folder_gguf

ROUTERS = ("prefix", "pow2")  # prefix-cache affinity (ours), Ray Serve's default power of two choices
APP_NAME = "tinyllama"  # the Ray Serve application's name


@dataclass
class ClusterSettings:
    """A cluster: the model every replica loads, how many replicas (a fixed count, or min..max with autoscaling on
    ongoing requests), the router and its settings, and the options of the app each replica serves (those of
    `tinyllama serve`, under the same names as its flags)."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    backend: str = "numpy"
    weights_dtype: str = "auto"
    served_model_name: str | list[str] | None = None  # default: the model value; a list: the name, then aliases
    chat_template: str | None = None  # a template name (chatml, zephyr, llama-2) or Jinja text (--chat-template)
    pooling: str = DEFAULT_POOLING  # how /v1/embeddings pools the last hidden state
    threads: int = 1  # compute threads of each replica (and the CPUs Ray reserves for it)
    replicas: int = 1  # the count; with max_replicas above it, the autoscaler's minimum
    max_replicas: int | None = None  # > replicas: autoscale between the two on ongoing requests
    target_ongoing_requests: float | None = None  # per replica, the autoscaler's target (default max_active)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    router: str = "prefix"
    imbalance: int = 8  # the preferred replica's queue may exceed the shortest by this much; beyond, load wins
    router_blocks: int = 200_000  # prefix blocks the router remembers per replica (least recently routed go first)
    max_active: int = 32
    max_queue: int = 256
    max_request_mb: float = 8.0
    read_timeout: float = 30.0
    trace_memory_mb: float = TRACE_MEMORY_LIMIT / 2 ** 20
    speculate: int = 0
    draft: str = "lookup"
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB  # 0: no prefix cache
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    shutdown_timeout: float = 30.0  # seconds a replica being removed gets to finish its requests
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    ingress_replicas: int = 1

    @classmethod
    def from_dict(cls, values: dict | None) -> "ClusterSettings":
        """Settings from a mapping (a config file's `args:`); EngineError naming an unknown key or a bad value."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EngineError(f"unknown cluster setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        settings = cls(**values)
        settings.validate()
        return settings

    def to_dict(self) -> dict:
        """The settings as a plain dict (what from_dict takes back)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """EngineError with one line naming the first setting out of range."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise EngineError(f"cluster setting {message}")

        need(isinstance(self.model, str) and bool(self.model), f"model: a folder or Hub repo id, got {self.model!r}")
        need(not is_gguf_path(self.model) and folder_gguf(self.model) is None,
             f"model: a GGUF file cannot be served as replicas yet (the router tokenizes prompts with the "
             f"checkpoint's tokenizer.json); give a checkpoint folder or Hub repo id, got {self.model!r}")
        names = self.served_model_name
        need(names is None or (isinstance(names, str) and bool(names.strip())) or
             (isinstance(names, list) and bool(names) and all(isinstance(n, str) and n.strip() for n in names)),
             f"served_model_name: a name or a list of names, got {names!r}")
        if self.chat_template is not None:
            resolve_chat_template(self.chat_template, "cluster setting chat_template")
        need(self.pooling in POOLINGS, f"pooling: one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        need(self.backend in ("numpy", "triton"), f"backend: numpy or triton, got {self.backend!r}")
        need(self.weights_dtype in WEIGHTS_DTYPE_CHOICES,
             f"weights_dtype: one of {', '.join(WEIGHTS_DTYPE_CHOICES)}, got {self.weights_dtype!r}")
        for name in ("threads", "replicas", "max_active", "ingress_replicas", "router_blocks"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name}: an integer >= 1, got {value!r}")
        need(isinstance(self.max_queue, int) and self.max_queue >= 0, f"max_queue: an integer >= 0, got "
                                                                       f"{self.max_queue!r}")
        need(isinstance(self.imbalance, int) and self.imbalance >= 0, f"imbalance: an integer >= 0, got "
                                                                       f"{self.imbalance!r}")
        if self.max_replicas is not None:
            need(isinstance(self.max_replicas, int) and self.max_replicas >= self.replicas,
                 f"max_replicas: an integer >= replicas ({self.replicas}), got {self.max_replicas!r}")
        if self.target_ongoing_requests is not None:
            need(self.target_ongoing_requests > 0, f"target_ongoing_requests: > 0, got {self.target_ongoing_requests}")
        need(self.router in ROUTERS, f"router: one of {', '.join(ROUTERS)}, got {self.router!r}")
        need(self.draft in DRAFT_CHOICES, f"draft: one of {', '.join(DRAFT_CHOICES)}, got {self.draft!r}")
        need(isinstance(self.speculate, int) and self.speculate >= 0, f"speculate: an integer >= 0, got "
                                                                       f"{self.speculate!r}")
        need(self.draft == "lookup" or self.speculate > 0, f"draft: {self.draft} needs speculate >= 1")
        for name in ("max_request_mb", "read_timeout", "trace_memory_mb", "health_check_period_s",
                     "health_check_timeout_s"):
            need(getattr(self, name) > 0, f"{name}: > 0, got {getattr(self, name)}")
        for name in ("prefix_cache_mb", "shutdown_timeout", "upscale_delay_s", "downscale_delay_s"):
            need(getattr(self, name) >= 0, f"{name}: >= 0, got {getattr(self, name)}")
        need(self.api_key is None or bool(str(self.api_key).strip()), "api_key: empty")
        need(isinstance(self.allowed_origins, list), f"allowed_origins: a list, got {self.allowed_origins!r}")

    @property
    def name(self) -> str:
        """The model's name in the API (the first of served_model_name, else the model value)."""
        names = self.served_model_name
        return (names if isinstance(names, str) else names[0]) if names else self.model

    @property
    def aliases(self) -> tuple[str, ...]:
        """The other names the model answers to (served_model_name's after the first)."""
        names = self.served_model_name
        return tuple(names[1:]) if isinstance(names, list) else ()

    @property
    def autoscaling(self) -> bool:
        """Whether the replica count follows the load (max_replicas above replicas)."""
        return self.max_replicas is not None and self.max_replicas > self.replicas

    @property
    def most_replicas(self) -> int:
        """The largest replica count this cluster may reach."""
        return self.max_replicas if self.autoscaling else self.replicas

    def model_options(self) -> dict:
        """engine.load_model's keyword arguments (`ref` included)."""
        return {"ref": self.model, "backend": self.backend, "revision": self.revision,
                "weights_dtype": self.weights_dtype, "chat_template": self.chat_template}

    def app_options(self) -> dict:
        """engine.serve.create_app's keyword arguments but `load` and `on_load_error`: the single server's options."""
        return {"served_model_name": self.name, "model_aliases": self.aliases, "pooling": self.pooling,
                "api_key": self.api_key, "max_active": self.max_active,
                "max_queue": self.max_queue, "allowed_origins": list(self.allowed_origins),
                "max_request_bytes": int(self.max_request_mb * 2 ** 20), "read_timeout": self.read_timeout,
                "trace_memory_limit": int(self.trace_memory_mb * 2 ** 20),
                "speculation": {"speculate": self.speculate, "draft": self.draft},
                "prefix_cache_mb": self.prefix_cache_mb}

    def thread_env(self) -> dict[str, str]:
        """Environment variables that hold a replica's kernels and BLAS to `threads` threads."""
        n = str(self.threads)
        return {"TINYLLAMA_NUM_THREADS": n, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
