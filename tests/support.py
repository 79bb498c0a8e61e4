"""Helpers shared by the test modules (importable because pytest's ``pythonpath`` holds ``tests``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: Tiny model grid ``(x, y, z)`` for end-to-end runs that must stay cheap.
TINY_SIZE = (32, 32, 32)


def rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Proper rotation Rz @ Ry @ Rx, ``(3, 3)`` float64."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def blob(centre: tuple[float, float, float], sigma: float = 5.0, shape: tuple[int, ...] = TINY_SIZE) -> np.ndarray:
    """Smooth float32 Gaussian blob (numpy ``(z, y, x)`` order), peak 100, zero near the border."""
    axes = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    r2 = sum((a - c) ** 2 for a, c in zip(axes, centre))
    return (100.0 * np.exp(-r2 / (2 * sigma**2))).astype(np.float32)


def write_array(array: np.ndarray, path: Path, is_vector: bool = False) -> Path:
    """Write a numpy ``(z, y, x)`` array as an image of 1 mm spacing; returns ``path``."""
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    image.SetSpacing([1.0] * image.GetDimension())
    sitk.WriteImage(image, str(path))
    return path


def label_volume(shape: tuple[int, int, int] = TINY_SIZE) -> np.ndarray:
    """An int16 label map with labels 3, 7 and 12 over background 0."""
    seg = np.zeros(shape, dtype=np.int16)
    seg[8:16, 8:24, 8:24] = 3
    seg[16:24, 8:24, 8:24] = 7
    seg[12:20, 12:20, 12:20] = 12
    return seg


def tiny_inputs(root: Path) -> dict[str, object]:
    """A fixed/moving blob pair, an int16 label map and a random-weight released-format checkpoint in ``root``."""
    import torch

    from iirp.model import RPNet

    torch.manual_seed(0)
    net = RPNet(size=TINY_SIZE)
    ckpt = root / "tiny.pt"
    config = {"size": TINY_SIZE, "in_channel": 1, "first_channel": 8}
    torch.save({"config": config, "model_state": net.state_dict()}, ckpt)
    return {
        "fixed": write_array(blob((15.5, 15.5, 15.5)), root / "fixed.nii.gz"),
        "moving": write_array(blob((14.0, 17.0, 15.0)), root / "moving.nii.gz"),
        "seg": write_array(label_volume(), root / "seg.nii.gz"),
        "ckpt": ckpt,
        "state": net.state_dict(),
    }


def tiny_export(root: Path) -> tuple[dict[str, object], Path]:
    """:func:`tiny_inputs` in ``root`` plus their checkpoint exported to ``root/engines`` (fp32, static, unverified).

    Uses the torchscript exporter: seconds instead of the dynamo exporter's minute on a small CPU
    (tests/export covers the dynamo path).
    """
    from iirp.export import export_checkpoint

    data = tiny_inputs(root)
    export_checkpoint(data["ckpt"], root / "engines", verify=False, progress=False, exporter="torchscript")
    return data, root / "engines"


def stale_partial(folder: Path) -> Path:
    """A staging folder as a run killed outright (SIGKILL) leaves it: this host, a process that is gone."""
    import os
    import subprocess
    import sys

    from iirp.atomic import partial_name

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    name = partial_name().replace(f"-{os.getpid()}-", f"-{gone.pid}-") + "killed"
    path = folder / name
    path.mkdir()
    (path / "warped.nii.gz").write_bytes(b"half a file")
    return path
