"""fp16 export: float16 weights and compute inside, float32 at the interface; within the fp16 tolerances."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from export_support import SIZE, Exported, stage_pairs

from iirp.export import FP16_GRAPH_TOLERANCE, FP16_TOLERANCE
from iirp.manifest import STAGES, Manifest


def test_manifest_says_fp16(fp16_export: Exported) -> None:
    manifest = Manifest.load(fp16_export.folder)
    manifest.verify_files(fp16_export.folder)
    assert manifest.precision == "fp16"
    for stage in manifest.stages.values():
        assert all(t.dtype == "float32" for t in [*stage.inputs, *stage.outputs])


@pytest.mark.parametrize("stage", STAGES)
def test_graph_is_float16_inside_float32_outside(fp16_export: Exported, stage: str) -> None:
    model = onnx.load(str(fp16_export.folder / f"{stage}.onnx"))
    graph = model.graph
    assert {i.data_type for i in graph.initializer} == {onnx.TensorProto.FLOAT16}
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    io_names = {v.name for v in [*graph.input, *graph.output]}
    for value in inferred.value_info:  # every intermediate tensor is float16
        if value.name not in io_names:
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16, value.name
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and graph.node[0].op_type == "Cast" and graph.node[-1].op_type == "Cast"


def test_onnxruntime_fp16_within_tolerance_of_torch_fp32(fp16_export: Exported, tiny_net) -> None:  # type: ignore[no-untyped-def]
    pairs = stage_pairs(fp16_export.folder, fp16_export.manifest, tiny_net, SIZE, seed=3)
    for stage, outputs in pairs.items():
        for got, ref in outputs:
            assert got.dtype == np.float32 and got.shape == ref.shape
            err = float(np.abs(got - ref).max())
            assert err <= FP16_TOLERANCE.limit(float(np.abs(ref).max())), (stage, err)
            assert err > 0.0, "fp16 weights should change the result at least a little"


def test_onnxruntime_fp16_matches_fp16_weight_emulation(fp16_export: Exported, tiny_net) -> None:  # type: ignore[no-untyped-def]
    twin = copy.deepcopy(tiny_net)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.half().float())
    pairs = stage_pairs(fp16_export.folder, fp16_export.manifest, twin, SIZE, seed=4)
    for stage, outputs in pairs.items():
        for got, ref in outputs:
            err = float(np.abs(got - ref).max())
            assert err <= FP16_GRAPH_TOLERANCE.limit(float(np.abs(ref).max())), (stage, err)


def test_tolerances_are_ordered() -> None:
    assert FP16_GRAPH_TOLERANCE.atol < FP16_TOLERANCE.atol and FP16_GRAPH_TOLERANCE.rtol < FP16_TOLERANCE.rtol
