"""fp16 stages with fp32 inputs and outputs, converted from the exported fp32 ONNX graph.

The conversion, done in place on the graph:

1. every float32 initializer (and float32 ``Constant``) becomes float16;
2. each graph input gets a ``Cast(to=FLOAT16)`` right after it and each graph output a
   ``Cast(to=FLOAT)`` right before it, so the file's interface stays float32 and the same
   runtime code drives fp32 and fp16 folders;
3. intermediate ``value_info`` types become float16.

Everything between the casts is then float16 by ONNX type inference, which is what a
strongly typed TensorRT network builds from (no builder precision flags).

What onnxruntime's CPU provider does with such a graph (onnxruntime 1.32, x86-64): it has no
float16 kernel for Conv, LeakyRelu, Add or AveragePool (Concat it has), so at session
creation its ``InsertCastTransformer`` (run at every graph optimisation level,
``ORT_DISABLE_ALL`` included) wraps those nodes in casts back to float32, then drops the
back-to-back cast pairs. On ORT CPU an fp16 file thus computes in float32 from
float16-rounded weights: the feature extractor's input and outputs are not rounded at all, the
estimators' inputs are rounded to float16 (their Concat runs in float16), their flow is not.
Float16 arithmetic is not exercised; see :mod:`iirp.export.verify` for how fp16 files are
checked regardless.

Only the operators these stages use are accepted, so nothing with a hidden dtype attribute
(``Cast``, ``ConstantOfShape``, ...) is converted silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iirp.export.errors import ExportError

if TYPE_CHECKING:
    import onnx

__all__ = ["FP16_SAFE_OPS", "convert_to_fp16"]

#: operators whose float16 form needs nothing beyond float16 operands
FP16_SAFE_OPS = frozenset({"Conv", "LeakyRelu", "Relu", "Add", "Mul", "Concat", "AveragePool", "Identity", "Constant"})


def convert_to_fp16(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Convert a float32 stage graph to float16 weights and compute with float32 I/O, in place.

    Args:
        model: an exported float32 stage (weights embedded).

    Returns:
        ``model`` itself, converted and checked by ``onnx.checker`` with full shape inference.

    Raises:
        ExportError: the graph uses an operator outside :data:`FP16_SAFE_OPS`, has
            non-float32 inputs or outputs, or fails the checker after conversion.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    unknown = sorted(
        {n.op_type for n in graph.node if n.op_type not in FP16_SAFE_OPS or n.domain not in ("", "ai.onnx")}
    )
    if unknown:
        raise ExportError(f"fp16 conversion of {graph.name}: unsupported operators {', '.join(unknown)}")
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise ExportError(f"fp16 conversion of {graph.name}: {value.name!r} is not float32")

    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16

    inputs = {i.name: f"{i.name}_fp16" for i in graph.input}
    outputs = {o.name: f"{o.name}_fp16" for o in graph.output}
    body = list(graph.node)
    renamed = {**inputs, **outputs}  # an output may also feed later nodes (f1 feeds the pooling)
    for node in body:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        for k, name in enumerate(node.output):
            if name in outputs:
                node.output[k] = outputs[name]
    head = [helper.make_node("Cast", [n], [h], to=TensorProto.FLOAT16, name=f"cast_{n}_to_fp16")
            for n, h in inputs.items()]
    tail = [helper.make_node("Cast", [h], [n], to=TensorProto.FLOAT, name=f"cast_{n}_to_fp32")
            for n, h in outputs.items()]
    del graph.node[:]
    graph.node.extend(head + body + tail)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"fp16 conversion of {graph.name} produced an invalid graph: {err}") from err
    return model
