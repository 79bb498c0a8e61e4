"""PyTorch RP-Net, checkpoint loading and the reference IIRP loop (needs torch)."""

from __future__ import annotations

from iirp.model.checkpoint import CheckpointInfo, load_checkpoint, load_state_dict, sha256_file
from iirp.model.reference import TorchLevelOps, register_arrays, register_tensors
from iirp.model.rpnet import FeatureExtractor, FlowEstimator, RPNet
from iirp.model.spatial import compose, ncc, upsample_flow, warp

__all__ = [
    "CheckpointInfo", "FeatureExtractor", "FlowEstimator", "RPNet",
    "TorchLevelOps", "compose", "load_checkpoint", "load_state_dict", "ncc", "register_arrays",
    "register_tensors", "sha256_file", "upsample_flow", "warp",
]
