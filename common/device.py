"""Device selection shared by every training and unlearning path.

Why: devices unlearn on a GPU when they have one and on the CPU otherwise; one resolver keeps the
``auto`` rule identical for the CLI, the ClientApp and the benchmarks.
"""

from __future__ import annotations

import torch


def resolve_device(setting: str | torch.device = "auto") -> torch.device:
    """Map ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` to a usable ``torch.device``.

    ``auto`` picks CUDA when available, else CPU; asking for CUDA explicitly on a machine
    without it is an error rather than a silent fallback, so benchmarks never mislabel a run.
    """
    if isinstance(setting, torch.device):
        return setting
    name = setting.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r} requested but CUDA is not available on this machine")
        return torch.device(name)
    raise ValueError(f"unknown device setting {setting!r}; use auto, cpu, cuda or cuda:N")
