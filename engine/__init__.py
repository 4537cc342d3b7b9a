"""Our inference engine. `from engine import pipeline, GenerationConfig` is the Python API (engine/pipelines.py),
loaded on first use so that importing `engine` (or any submodule) stays light."""

_LAZY = {"pipeline", "GenerationConfig", "Pipeline", "Response"}


def __getattr__(name: str):
    if name in _LAZY:
        from engine import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


__all__ = sorted(_LAZY)
