"""Shared tiny exports for the export tests.

The model grid is anisotropic, (16, 24, 32), so a swapped axis anywhere shows up as a shape
error. A dynamo export of the five stages costs over a minute on a small CPU (torchscript:
a few seconds), so the three exports (fp32 static, fp16 static, fp32 dynamic) are
session-scoped and shared and use the torchscript exporter; the dynamo exporter is tested on
one stage (test_export_fp32.py::test_dynamo_exporter_on_one_stage).
"""

from __future__ import annotations

import pytest
from support import tiny_inputs

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export_support import SIZE, Exported, Tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from iirp.model import RPNet

    root = tmp_path_factory.mktemp("export_tiny")
    data = tiny_inputs(root)  # 32^3 blob images (resampled onto SIZE by prepare_pair)
    torch.manual_seed(1)
    net = RPNet(size=SIZE)
    ckpt = root / "tiny_aniso.pt"
    torch.save({"config": {"size": SIZE, "in_channel": 1, "first_channel": 8}, "model_state": net.state_dict()}, ckpt)
    return Tiny(root, ckpt, data["fixed"], data["moving"])  # type: ignore[arg-type]


def _export(tiny: Tiny, name: str, **kw: object) -> Exported:
    from iirp.export import export_checkpoint

    folder = tiny.root / name
    manifest = export_checkpoint(tiny.ckpt, folder, progress=False, **kw)  # type: ignore[arg-type]
    return Exported(folder, manifest)


@pytest.fixture(scope="session")
def fp32_export(tiny: Tiny) -> Exported:
    """Static fp32, torchscript exporter, verified on random input and the blob pair."""
    return _export(tiny, "fp32", verify_pair=(tiny.fixed, tiny.moving), exporter="torchscript")


@pytest.fixture(scope="session")
def fp16_export(tiny: Tiny) -> Exported:
    """Static fp16, torchscript exporter, verified on random input."""
    return _export(tiny, "fp16", precision="fp16", exporter="torchscript")


@pytest.fixture(scope="session")
def dynamic_export(tiny: Tiny) -> Exported:
    """Dynamic fp32, torchscript exporter (parity is checked by the tests, at two other shapes)."""
    return _export(tiny, "dynamic", dynamic=True, verify=False, exporter="torchscript")  # the tests check two other shapes themselves


@pytest.fixture(scope="session")
def tiny_net(tiny: Tiny):  # type: ignore[no-untyped-def]
    from iirp.model import load_checkpoint

    return load_checkpoint(tiny.ckpt)[0]
