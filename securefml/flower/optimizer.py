"""The server step the Flower strategy takes: the same ``ServerOptimizer`` as the in-process server."""

from securefml.optimizer import ServerOptimizer

__all__ = ["ServerOptimizer"]
