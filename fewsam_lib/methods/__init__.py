"""Methods: one registry (:mod:`.base`), shared SAM decoding, and one module per method."""

from .base import CasePrediction, Method, MethodRun, PlannedRun, RunContext, get_method, register_method

_loaded = False


def load_builtin_methods() -> None:
    """Import the shipped methods once; each module registers its method when imported."""
    global _loaded
    if not _loaded:
        _loaded = True
        from . import fewshot, nnunet, prompting, within_volume  # noqa: F401


__all__ = [
    "CasePrediction",
    "Method",
    "MethodRun",
    "PlannedRun",
    "RunContext",
    "get_method",
    "load_builtin_methods",
    "register_method",
]
