"""Write the hostile-input corpus (tests/fuzz/corpus/): crafted ONNX files that must each be refused with a
one-line error and exit 2, never a crash, a hang or a huge allocation. Run to regenerate:

    .venv/bin/python tests/fuzz/make_corpus.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CORPUS = Path(__file__).resolve().parent / "corpus"


def _model(nodes, inputs=None, outputs=None, inits=(), opsets=(("", 18),), ir_version=10):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])]
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = ir_version
    return m


def _relu():
    return [helper.make_node("Relu", ["x"], ["y"])]


def _external(name: str, location: str, length: int, dims=(4, 4)) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def cases() -> dict[str, bytes | onnx.ModelProto]:
    out: dict[str, bytes | onnx.ModelProto] = {}
    good = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                  inits=[numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    good_bytes = good.SerializeToString()
    out["empty.onnx"] = b""
    out["random_bytes.onnx"] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    out["text.onnx"] = b"ir_version: 10\ngraph { name: 'not binary' }\n" * 20
    out["truncated.onnx"] = good_bytes[: len(good_bytes) // 2]
    big = TensorProto()
    big.name, big.data_type, big.raw_data = "w", TensorProto.FLOAT, b"\0" * 16
    big.dims.extend([1_000_000, 1_000_000])
    out["absurd_tensor.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], inits=[big])
    typed = TensorProto()
    typed.name, typed.data_type = "w", TensorProto.FLOAT
    typed.dims.extend([1_000_000, 4])
    typed.float_data.extend([1.0] * 8)
    out["typed_data_short.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], inits=[typed])
    neg = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    neg.dims[0] = -4
    out["negative_dim.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], inits=[neg])
    out["external_absolute.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                                           inits=[_external("w", "/etc/passwd", 64)])
    out["external_parent.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                                         inits=[_external("w", "../../../../etc/passwd", 64)])
    out["external_missing.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                                          inits=[_external("w", "nowhere.data", 64)])
    out["external_absurd_length.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                                                inits=[_external("w", "small.data", 4 * 10**12,
                                                                 dims=(10**6, 10**6))])
    out["small.data"] = b"\0" * 64
    out["cycle.onnx"] = _model([helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                                helper.make_node("Add", ["x", "a"], ["y"])])
    out["duplicate_outputs.onnx"] = _model([helper.make_node("Relu", ["x"], ["y"]),
                                            helper.make_node("Sigmoid", ["x"], ["y"])])
    out["dangling_input.onnx"] = _model([helper.make_node("Add", ["x", "ghost"], ["y"])])
    out["unknown_domain.onnx"] = _model([helper.make_node("Explode", ["x"], ["y"], domain="com.evil")])
    out["unknown_domain_imported.onnx"] = _model([helper.make_node("Explode", ["x"], ["y"], domain="com.evil")],
                                                 opsets=(("", 18), ("com.evil", 1)))
    out["no_opset.onnx"] = _model(_relu(), opsets=())
    out["ir_version_zero.onnx"] = _model(_relu(), ir_version=0)
    out["absurd_input_dims.onnx"] = _model(
        _relu(), inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [10**6, 10**6])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [10**6, 10**6])])
    undefined = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    undefined.data_type = 0
    out["undefined_dtype.onnx"] = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], inits=[undefined])
    # deeply nested If subgraphs: recursion must fail cleanly
    leaf = helper.make_graph([helper.make_node("Relu", ["x"], ["z"])], "b", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    body = leaf
    for _ in range(30):  # protobuf caps message depth near 100; one branch nests so the file stays linear
        node = helper.make_node("If", ["c"], ["z"], then_branch=body, else_branch=leaf)
        body = helper.make_graph([node], "b", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    out["deep_nesting.onnx"] = _model([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=leaf)],
                                      inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                                              helper.make_tensor_value_info("c", TensorProto.BOOL, [])])
    return out


def write(folder: Path = CORPUS) -> list[Path]:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    written = []
    for name, content in cases().items():
        data = content if isinstance(content, bytes) else content.SerializeToString()
        (folder / name).write_bytes(data)
        written.append(folder / name)
    return written


if __name__ == "__main__":
    for p in write():
        print(p.relative_to(CORPUS.parent.parent.parent), p.stat().st_size)
