"""Engine backends, one file each; `get(name)` returns the backend for an engine name."""

from __future__ import annotations

from .base import Backend, StartSpec


def get(name: str, settings) -> Backend:  # noqa: ANN001 - Settings, imported lazily
    if name == "llamacpp":
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(settings)
    if name == "vllm":
        from .vllm import VllmBackend

        return VllmBackend(settings)
    raise KeyError(f"unknown engine {name!r}")


__all__ = ["Backend", "StartSpec", "get"]
