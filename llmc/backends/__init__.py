"""Backends turn each rank's graph into files, and load those files back as a callable program."""

from llmc.backends import torch_backend

BACKENDS = {"torch": torch_backend}


def get_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
