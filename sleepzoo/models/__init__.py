"""Model builders (kind ``model``) and the engine contract they implement."""

from .base import Block, SleepModel, SwiGLU

__all__ = ["Block", "SleepModel", "SwiGLU"]
