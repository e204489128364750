"""Shared library for any-order ARMs and marginalization models.

``mamlib.load(path)`` opens a trained checkpoint or a folder written by ``mode=export`` (see mamlib/api.py).
"""


def load(path, device="cpu"):
    """A trained model (:class:`mamlib.api.Model`) from a checkpoint file or an exported folder, in eval mode on ``device``."""
    from .api import load as load_model  # imported on use: ``import mamlib`` stays light

    return load_model(path, device=device)
