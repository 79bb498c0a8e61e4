"""Constants, records and onnxruntime-vs-PyTorch helpers shared by the export tests.

The stage runs use plain torch and onnxruntime, no iirp.export code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from iirp.manifest import Manifest, estimator_stage

#: tiny anisotropic model grid (X, Y, Z)
SIZE = (16, 24, 32)


@dataclass(frozen=True)
class Tiny:
    """A random-weight released-format checkpoint of grid SIZE, its network, and a blob pair."""

    root: Path
    ckpt: Path
    fixed: Path
    moving: Path


@dataclass(frozen=True)
class Exported:
    folder: Path
    manifest: Manifest


STAGE_FILES = {
    "feature_extractor.onnx", "flow_estimator_1.onnx", "flow_estimator_2.onnx", "flow_estimator_3.onnx",
    "flow_estimator_4.onnx",
}


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def stage_pairs(
    folder: Path, manifest: Manifest, net: torch.nn.Module, shape: tuple[int, int, int], seed: int = 0
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """For every stage: [(onnxruntime output, torch output), ...] on a random image of ``shape`` (X, Y, Z).

    Estimators get the torch features of that image (moving = batch 1, fixed = batch 0).
    """
    rng = np.random.default_rng(seed)
    image = rng.random((2, 1, *shape), dtype=np.float32)
    with torch.inference_mode():
        feats = [f.numpy() for f in net.encoder(torch.from_numpy(image))]
    out = {"feature_extractor": list(zip(ort_run(folder / manifest.stages["feature_extractor"].file, {"image": image}), feats))}
    for level in (1, 2, 3, 4):
        moving, fixed = np.ascontiguousarray(feats[level - 1][1:2]), np.ascontiguousarray(feats[level - 1][0:1])
        with torch.inference_mode():
            ref = net.estimator(level)(torch.from_numpy(moving), torch.from_numpy(fixed)).numpy()
        stage = estimator_stage(level)
        got = ort_run(folder / manifest.stages[stage].file, {"moving_features": moving, "fixed_features": fixed})
        out[stage] = [(got[0], ref)]
    return out
