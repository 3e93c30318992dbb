"""Errors meant for the user: the CLI prints their message, never a traceback."""

from typing import Mapping, TypeVar

T = TypeVar("T")


class FewsamError(Exception):
    """Base class of every error whose message alone tells the user what is wrong."""


class ManifestError(FewsamError):
    """A manifest is malformed or names something that does not exist."""


class VolumeError(FewsamError):
    """A NIfTI file cannot be read, or an image and its label do not belong together."""


class CheckpointError(FewsamError):
    """A checkpoint is missing, cannot be fetched, or does not match its published sha256."""


def lookup(registry: Mapping[str, T], name: str, kind: str, error: type[FewsamError] = FewsamError) -> T:
    """``registry[name]``, or an error that lists the known names."""
    try:
        return registry[name]
    except KeyError:
        raise error(f"unknown {kind} '{name}' (known: {', '.join(registry)})") from None
