"""Shared library for any-order ARMs and marginalization models.

``mamlib.load(path)`` opens a trained checkpoint or a folder written by ``mode=export`` (see mamlib/api.py).
"""


def load(path, device="auto", precision="fp32"):
    """A trained model (:class:`mamlib.api.Model`, a ``torch.nn.Module``) from a checkpoint file or an exported folder,
    in eval mode on ``device`` (``auto``: the accelerator when present, else the CPU), with its conditional passes at
    ``precision`` (``fp32``, ``bf16`` or ``auto``)."""
    from .api import load as load_model  # imported on use: ``import mamlib`` stays light

    return load_model(path, device=device, precision=precision)
