"""Small ONNX LSTM/GRU/RNN models with random weights, built with onnx.helper (no torch)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_model(op: str = "LSTM", *, dirs: int = 1, I: int = 24, H: int = 16, layout: int = 0, seq_lens: bool = False,
              initial: bool = False, bias: bool = True, lbr: int = 1, opset: int = 17, seed: int = 0,
              low_rank: int | None = None) -> onnx.ModelProto:
    """X [seq, batch, I] (layout 0) or [batch, seq, I] (layout 1) -> one recurrent op -> Y, Y_h (, Y_c).

    ``low_rank``: W and R have this rank (a model a rank-r rewrite reproduces exactly)."""
    rng = np.random.default_rng(seed)
    G = GATES[op]
    W = rng.standard_normal((dirs, G * H, I)).astype(np.float32) * 0.3
    if low_rank:
        W = (rng.standard_normal((dirs, G * H, low_rank)) @ rng.standard_normal((low_rank, I)) * 0.1).astype(np.float32)
    R = rng.standard_normal((dirs, G * H, H)).astype(np.float32) * 0.3
    if low_rank:
        R = (rng.standard_normal((dirs, G * H, low_rank)) @ rng.standard_normal((low_rank, H)) * 0.1).astype(np.float32)
    B = rng.standard_normal((dirs, 2 * G * H)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
    ins = ["X", "W", "R"]
    if bias or seq_lens or initial:
        inits.append(numpy_helper.from_array(B, "B"))
        ins.append("B" if bias else "")
    xshape = ["seq", "batch", I] if layout == 0 else ["batch", "seq", I]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, xshape)]
    if seq_lens or initial:
        ins.append("sl" if seq_lens else "")
        if seq_lens:
            inputs.append(helper.make_tensor_value_info("sl", TensorProto.INT32, ["batch"]))
    if initial:
        hshape = [dirs, "batch", H] if layout == 0 else ["batch", dirs, H]
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, hshape))
        ins.append("h0")
        if op == "LSTM":
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, hshape))
            ins.append("c0")
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    attrs = dict(hidden_size=H, direction="bidirectional" if dirs == 2 else "forward")
    if layout:
        attrs["layout"] = layout
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, ins, outs, name=f"{op.lower()}0", **attrs)
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3)) for o in outs]
    graph = helper.make_graph([node], f"{op.lower()}_test", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    m.ir_version = 8
    return m


def feeds(model: onnx.ModelProto, seq: int = 7, batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value or {"seq": seq, "batch": batch}[d.dim_param] for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TensorProto.INT32:
            out[vi.name] = rng.integers(1, seq + 1, size=dims).astype(np.int32)
        else:
            out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out
