"""Dynamic export: symbolic spatial dims in the files and the manifest, correct at other shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from export_support import SIZE, Exported, stage_pairs

from iirp.export import DYNAMIC_MAX, DYNAMIC_MIN, FP32_TOLERANCE
from iirp.manifest import ManifestMismatchError


def _dims(value) -> list:  # type: ignore[no-untyped-def]
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def test_manifest_records_symbols_and_range(dynamic_export: Exported) -> None:
    m = dynamic_export.manifest
    assert m.dynamic is True
    assert m.dynamic_range == {"min": [DYNAMIC_MIN] * 3, "opt": list(SIZE), "max": [DYNAMIC_MAX] * 3}
    assert m.model_grid["size"] == list(SIZE)
    fe = m.stages["feature_extractor"]
    assert fe.inputs[0].shape == [2, 1, "X", "Y", "Z"]
    assert [o.shape for o in fe.outputs] == [
        [2, 8, "X", "Y", "Z"], [2, 16, "X/2", "Y/2", "Z/2"], [2, 32, "X/4", "Y/4", "Z/4"], [2, 32, "X/8", "Y/8", "Z/8"],
    ]
    assert m.stages["flow_estimator_1"].outputs[0].shape == [1, 3, "X", "Y", "Z"]
    assert m.stages["flow_estimator_3"].inputs[1].shape == [1, 32, "X/4", "Y/4", "Z/4"]
    assert m.stages["flow_estimator_4"].inputs[0].resolve({"X": 160, "Y": 192, "Z": 160}) == (1, 32, 20, 24, 20)


def test_onnx_files_use_the_manifest_symbols(dynamic_export: Exported) -> None:
    for name, stage in dynamic_export.manifest.stages.items():
        graph = onnx.load(str(dynamic_export.folder / stage.file)).graph
        assert [_dims(v) for v in graph.input] == [t.shape for t in stage.inputs], name
        assert [_dims(v) for v in graph.output] == [t.shape for t in stage.outputs], name


@pytest.mark.parametrize("shape", [(32, 16, 24), (24, 40, 16)])
def test_runs_at_other_shapes(dynamic_export: Exported, tiny_net, shape: tuple[int, int, int]) -> None:  # type: ignore[no-untyped-def]
    pairs = stage_pairs(dynamic_export.folder, dynamic_export.manifest, tiny_net, shape, seed=5)
    for stage, outputs in pairs.items():
        for got, ref in outputs:
            assert got.shape == ref.shape, stage
            assert float(np.abs(got - ref).max()) <= FP32_TOLERANCE.limit(float(np.abs(ref).max())), stage
    flow = pairs["flow_estimator_1"][0][0]
    assert flow.shape == (1, 3, *shape)


def test_dynamic_manifest_checks_the_range(dynamic_export: Exported) -> None:
    m = dynamic_export.manifest
    m.check_input_shape((160, 192, 160))
    m.check_input_shape((16, 256, 24))
    with pytest.raises(ManifestMismatchError, match=r"outside the engines' dynamic range"):
        m.check_input_shape((8, 192, 160))
    with pytest.raises(ManifestMismatchError, match=r"outside the engines' dynamic range"):
        m.check_input_shape((160, 264, 160))
    with pytest.raises(ManifestMismatchError, match=r"multiples of 8"):
        m.check_input_shape((160, 190, 160))
