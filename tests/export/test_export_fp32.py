"""A static fp32 export of a tiny random RP-Net: files, manifest, and onnxruntime parity with torch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from export_support import SIZE, STAGE_FILES, Exported, Tiny, ort_run, stage_pairs

import iirp
from iirp.export import DEFAULT_OPSET, FP32_TOLERANCE
from iirp.manifest import FORMAT_VERSION, MANIFEST_NAME, STAGES, Manifest, ManifestMismatchError, sha256_file

#: (stage, output) -> (channels, level) of the static (16, 24, 32) export
EXPECTED_IO = {
    "feature_extractor": ([("image", [2, 1, 16, 24, 32])],
                          [("f1", [2, 8, 16, 24, 32]), ("f2", [2, 16, 8, 12, 16]),
                           ("f3", [2, 32, 4, 6, 8]), ("f4", [2, 32, 2, 3, 4])]),
    "flow_estimator_1": ([("moving_features", [1, 8, 16, 24, 32]), ("fixed_features", [1, 8, 16, 24, 32])],
                         [("flow", [1, 3, 16, 24, 32])]),
    "flow_estimator_2": ([("moving_features", [1, 16, 8, 12, 16]), ("fixed_features", [1, 16, 8, 12, 16])],
                         [("flow", [1, 3, 8, 12, 16])]),
    "flow_estimator_3": ([("moving_features", [1, 32, 4, 6, 8]), ("fixed_features", [1, 32, 4, 6, 8])],
                         [("flow", [1, 3, 4, 6, 8])]),
    "flow_estimator_4": ([("moving_features", [1, 32, 2, 3, 4]), ("fixed_features", [1, 32, 2, 3, 4])],
                         [("flow", [1, 3, 2, 3, 4])]),
}


def _graph_io(path) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    graph = onnx.load(str(path)).graph

    def spec(v):  # type: ignore[no-untyped-def]
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        return v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def test_writes_five_stages_and_a_manifest_only(fp32_export: Exported) -> None:
    names = {p.name for p in fp32_export.folder.iterdir()}
    assert names == STAGE_FILES | {MANIFEST_NAME}
    leftovers = [p.name for p in fp32_export.folder.parent.iterdir() if "iirp-partial" in p.name or "iirp-old" in p.name]
    assert leftovers == []


def test_manifest_hashes_and_contents(fp32_export: Exported, tiny: Tiny) -> None:
    folder, written = fp32_export.folder, fp32_export.manifest
    manifest = Manifest.load(folder)
    manifest.verify_files(folder)  # every sha256 matches
    for name, stage in manifest.stages.items():
        assert stage.file == f"{name}.onnx" and stage.sha256 == sha256_file(folder / stage.file)
        assert stage.engine_file is None and stage.engine_sha256 is None
    assert manifest == written
    raw = json.loads((folder / MANIFEST_NAME).read_text())
    assert raw["format"] == "iirp-engines" and raw["format_version"] == FORMAT_VERSION
    assert manifest.source_sha256 == sha256_file(tiny.ckpt)
    assert manifest.source_path == str(tiny.ckpt.absolute())
    assert manifest.model["n_resblocks"] == 2 and manifest.model["first_channel"] == 8
    assert manifest.model["feature_channels"] == [8, 16, 32, 32]
    assert manifest.model["estimator_channels"] == [16, 32, 32, 32]
    assert manifest.model["n_parameters"] == 419_964
    assert manifest.model_grid == {"size": list(SIZE), "spacing": [1.0, 1.0, 1.0], "orientation": "RAS"}
    assert manifest.size == SIZE
    assert manifest.precision == "fp32" and manifest.opset == DEFAULT_OPSET
    assert manifest.dynamic is False and manifest.dynamic_range is None
    assert manifest.intensity == "minmax"
    assert manifest.iterstop == {"rule": "official", "delta": 0.005, "max_iters": 10}
    assert manifest.exporter["method"] == "torchscript"
    assert "dynamo_error" not in manifest.exporter
    for lib in ("torch", "onnx", "onnxruntime"):
        assert manifest.exporter[lib]
    assert manifest.iirp_version == iirp.__version__
    assert manifest.tensorrt is None


def test_manifest_detects_an_altered_file(fp32_export: Exported, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp32_export.folder, copy)
    with open(copy / "flow_estimator_2.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestMismatchError, match=r"flow_estimator_2.onnx \(stage flow_estimator_2\) does not match"):
        Manifest.load(copy).verify_files(copy)


@pytest.mark.parametrize("stage", STAGES)
def test_graph_io_matches_manifest_and_contract(fp32_export: Exported, stage: str) -> None:
    inputs, outputs = _graph_io(fp32_export.folder / f"{stage}.onnx")
    want_in, want_out = EXPECTED_IO[stage]
    assert inputs == [(n, s, "float32") for n, s in want_in]
    assert outputs == [(n, s, "float32") for n, s in want_out]
    spec = fp32_export.manifest.stages[stage]
    assert [(t.name, t.shape, t.dtype) for t in spec.inputs] == inputs
    assert [(t.name, t.shape, t.dtype) for t in spec.outputs] == outputs


@pytest.mark.parametrize("stage", STAGES)
def test_weights_are_embedded(fp32_export: Exported, stage: str) -> None:
    model = onnx.load(str(fp32_export.folder / f"{stage}.onnx"), load_external_data=False)
    assert model.graph.initializer, "weights missing"
    for init in model.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL and not init.external_data, init.name
        assert init.data_type == onnx.TensorProto.FLOAT
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["iirp_stage"] == stage and meta["iirp_precision"] == "fp32"
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == DEFAULT_OPSET


def test_onnxruntime_matches_torch_fp32(fp32_export: Exported, tiny_net) -> None:  # type: ignore[no-untyped-def]
    pairs = stage_pairs(fp32_export.folder, fp32_export.manifest, tiny_net, SIZE, seed=7)
    assert set(pairs) == set(STAGES)
    for stage, outputs in pairs.items():
        for got, ref in outputs:
            assert got.dtype == np.float32 and got.shape == ref.shape, stage
            err = float(np.abs(got - ref).max())
            assert err <= FP32_TOLERANCE.limit(float(np.abs(ref).max())), (stage, err)
            assert err < 1e-4, (stage, err)
            np.testing.assert_allclose(got, ref, rtol=FP32_TOLERANCE.rtol, atol=FP32_TOLERANCE.atol)


def test_static_manifest_checks_input_shape(fp32_export: Exported) -> None:
    fp32_export.manifest.check_input_shape(SIZE)
    with pytest.raises(ManifestMismatchError, match=r"static shape \(16, 24, 32\), got \(32, 24, 16\)"):
        fp32_export.manifest.check_input_shape((32, 24, 16))


def test_dynamo_exporter_on_one_stage(tiny_net, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The default (dynamo) exporter on the coarsest estimator: names, shapes and onnxruntime parity.

    One stage keeps it to seconds; the ``auto`` fallback logic is tested in test_export_failures.py.
    """
    import torch

    from iirp.export.onnx_export import export_stage
    from iirp.export.stages import example_inputs, stage_io, stage_module
    from iirp.model.rpnet import level_channels

    stage = "flow_estimator_4"
    io = stage_io(level_channels(8)[0], SIZE)[stage]
    args = example_inputs(io, SIZE)
    path = tmp_path / f"{stage}.onnx"
    export_stage(stage_module(tiny_net, stage), args, path, io, opset=DEFAULT_OPSET, method="dynamo")
    inputs, outputs = _graph_io(path)
    assert [name for name, _, _ in inputs] == ["moving_features", "fixed_features"]
    assert [name for name, _, _ in outputs] == ["flow"]
    feeds = {"moving_features": args[0].numpy(), "fixed_features": args[1].numpy()}
    got = ort_run(path, feeds)[0]
    with torch.inference_mode():
        ref = stage_module(tiny_net, stage)(*args).numpy()
    assert got.shape == ref.shape == (1, 3, 2, 3, 4)
    assert float(np.abs(got - ref).max()) <= FP32_TOLERANCE.limit(float(np.abs(ref).max()))
