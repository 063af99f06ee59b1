"""The request routers living in this process, by (application, deployment): how the ingress finds the router of its
own deployment handle (to list the replicas it routes to, and read its decision counts).

A module of its own, imported by reference: Ray Serve pickles a request router's module *by value* (its globals are
copied into every process that unpickles the class), so state shared with the ingress cannot live there.
"""
from __future__ import annotations

import threading

_ROUTERS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def register(app_name: str, deployment_name: str, router) -> None:
    """Record `router` as this process's router for that deployment (the latest one wins)."""
    with _LOCK:
        _ROUTERS[(app_name, deployment_name)] = router


def router_of(app_name: str, deployment_name: str):
    """This process's router for that deployment, or None before its handle made one."""
    with _LOCK:
        return _ROUTERS.get((app_name, deployment_name))
