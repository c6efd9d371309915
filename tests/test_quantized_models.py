"""Models that come quantized (onnxruntime's quantizers): what is quantized is reported per
weight and in one note; only the float part is compressed."""
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from onnxhmf import optimize
from onnxhmf.errors import OnnxHmfError
from onnxhmf.graph.index import GraphIndex
from onnxhmf.graph.quantized import QuantizedWeight
from onnxhmf.graph.sites import find_weight_groups

quant = pytest.importorskip("onnxruntime.quantization")
logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing advice


def float_model(tmp_path):
    """Gather(E) → MatMul(W) → Gemm(W2, transB) → MatMul(W3): four float weights."""
    E, W, W2, W3 = (graphs.matrix(*s, seed=i) for i, s in enumerate([(100, 64), (64, 64), (64, 64), (64, 32)]))
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="g"),
             helper.make_node("MatMul", ["e", "W"], ["y"], name="mm"),
             helper.make_node("Gemm", ["y", "W2"], ["z"], name="gemm", transB=1),
             helper.make_node("MatMul", ["z", "W3"], ["out"], name="mm3")]
    inits = [numpy_helper.from_array(a, n) for a, n in [(E, "E"), (W, "W"), (W2, "W2"), (W3, "W3")]]
    m = graphs.model(nodes, [graphs.vi("ids", ["b"], TensorProto.INT64)], [graphs.vi("out", ["b", 32])], inits)
    p = tmp_path / "f.onnx"
    onnx.save(m, p)
    return p


class _Reader(quant.CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.it = iter([{"ids": rng.integers(0, 100, (4,)).astype(np.int64)} for _ in range(4)])

    def get_next(self):
        return next(self.it, None)


def sites(model):
    out, report = optimize(model, rank=8, verify=False)
    return out, report, {s.weight: s for s in report.sites}


def test_quantize_dynamic_all_weights(tmp_path):
    p = float_model(tmp_path)
    quant.quantize_dynamic(p, tmp_path / "q.onnx", op_types_to_quantize=["MatMul", "Gemm", "Gather"])
    q = onnx.load(tmp_path / "q.onnx")
    with pytest.raises(OnnxHmfError) as e:
        optimize(q, rank=8, verify=False)
    msg = str(e.value)
    assert msg.startswith("no compressible weights: every weight is already quantized (")
    assert "3x int8 MatMulInteger weight, dynamic quantization" in msg and "1x uint8 table read by Gather" in msg
    assert "is not fp32" not in msg
    groups = {g.name: g for g in find_weight_groups(GraphIndex(q))}
    assert {"E_quantized", "W_quantized", "W3_quantized"} <= set(groups)
    assert "uint8 table read by Gather" in groups["E_quantized"].skip_reason and groups["E_quantized"].ops == "gather"
    mi = groups["W_quantized"]
    assert isinstance(mi, QuantizedWeight) and mi.ops == "matmulinteger" and mi.shape == (64, 64)
    assert "int8 MatMulInteger weight, dynamic quantization" in mi.skip_reason and "float weights only" in mi.skip_reason


def test_quantize_dynamic_partial_compresses_the_float_part(tmp_path):
    p = float_model(tmp_path)
    quant.quantize_dynamic(p, tmp_path / "q.onnx", op_types_to_quantize=["MatMul", "Gemm"])  # the Gather stays float
    out, report, by = sites(onnx.load(tmp_path / "q.onnx"))
    assert by["W_quantized"].status == "skipped" and "already quantized" in by["W_quantized"].reason
    assert by["W2_Transposed_quantized"].status == "skipped" and by["E"].status == "rewritten"
    (note,) = [n for n in report.notes if n.startswith("already quantized")]
    assert "3 weight(s), 10,240 params" in note and "3 MatMulInteger weight (dynamic quantization)" in note
    assert "compressed 1 of the 1 float weight(s)" in note


@pytest.mark.slow  # torch import and export: ~4 s
def test_quantize_dynamic_lstm(tmp_path):
    torch = pytest.importorskip("torch")

    class L(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.out = torch.nn.LSTM(16, 32, batch_first=True), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.out(self.lstm(x)[0])

    torch.manual_seed(0)
    torch.onnx.export(L(), (torch.randn(1, 5, 16),), tmp_path / "l.onnx", dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    quant.quantize_dynamic(tmp_path / "l.onnx", tmp_path / "q.onnx")
    q = onnx.load(tmp_path / "q.onnx")
    groups = [g for g in find_weight_groups(GraphIndex(q)) if isinstance(g, QuantizedWeight)]
    whats = sorted(g.what for g in groups)
    assert whats == ["DynamicQuantizeLSTM R", "DynamicQuantizeLSTM W", "MatMulInteger weight"]
    shapes = {g.what: g.shape for g in groups}
    assert shapes["DynamicQuantizeLSTM W"] == (16, 128) and shapes["DynamicQuantizeLSTM R"] == (32, 128)
    with pytest.raises(OnnxHmfError, match="already quantized .*DynamicQuantizeLSTM"):
        optimize(q, rank=4, verify=False)


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_quantize_static(tmp_path, fmt):
    p = float_model(tmp_path)
    quant.quantize_static(p, tmp_path / "q.onnx", _Reader(), quant_format=getattr(quant.QuantFormat, fmt))
    q = onnx.load(tmp_path / "q.onnx")
    groups = {g.name: g for g in find_weight_groups(GraphIndex(q))}
    reasons = {n: g.skip_reason for n, g in groups.items()}
    assert all(r and r.startswith("already quantized") for r in reasons.values()), reasons
    if fmt == "QDQ":
        assert "DequantizeLinear → MatMul, QDQ" in reasons["W_quantized"]
        assert "DequantizeLinear → Gemm" in reasons["W2_quantized"]
        assert "DequantizeLinear → Gather" in reasons["E_quantized"]
    else:
        assert "QLinearMatMul weight, static quantization, QOperator" in reasons["W_quantized"]
        assert "QGemm weight" in reasons["W2_quantized"]


def test_matmul_nbits(tmp_path):
    pytest.importorskip("onnx_ir")  # the MatMulNBits quantizer needs it
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    p = float_model(tmp_path)
    qz = MatMulNBitsQuantizer(onnx.load(p), block_size=32, is_symmetric=True)
    qz.process()
    q = qz.model.model
    out, report, by = sites(q)
    nb = by["W_Q4"]
    assert nb.status == "skipped" and nb.shape == (64, 64) and nb.ops == "matmulnbits"
    assert "4-bit codes in uint8 MatMulNBits weight, block-quantized, block 32" in nb.reason
    assert by["W2"].status == "rewritten" and by["E"].status == "rewritten"  # Gemm and Gather stay float
    assert any("already quantized: 2 weight(s)" in n for n in report.notes)


def test_gather_block_quantized_and_int4_qdq():
    """Hand-built: a GatherBlockQuantized table and an int4 DequantizeLinear → MatMul (what
    onnxruntime fuses to MatMulNBits), next to a float MatMul."""
    codes = numpy_helper.from_array(np.zeros((50, 16), np.uint8), "Eq")  # 50×32 int4, two per byte
    scales = numpy_helper.from_array(np.ones((50, 1), np.float32), "Es")
    w4 = helper.make_tensor("W4", TensorProto.INT4, [32, 32], np.zeros(32 * 32, np.int8).tolist())
    s4 = numpy_helper.from_array(np.ones((2, 32), np.float32), "S4")
    nodes = [
        helper.make_node("GatherBlockQuantized", ["Eq", "ids", "Es"], ["e"], name="gbq", domain="com.microsoft",
                         block_size=32, quantize_axis=1),
        helper.make_node("DequantizeLinear", ["W4", "S4"], ["w"], name="dq", axis=0, block_size=16),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="mm"),
        helper.make_node("MatMul", ["y", "Wf"], ["out"], name="mmf"),
    ]
    g = helper.make_graph(nodes, "g", [graphs.vi("ids", ["b"], TensorProto.INT64)], [graphs.vi("out", ["b", 32])],
                          [codes, scales, w4, s4, numpy_helper.from_array(graphs.matrix(32, 32), "Wf")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    groups = {x.name: x for x in find_weight_groups(GraphIndex(m))}
    assert "GatherBlockQuantized table, block-quantized" in groups["Eq"].skip_reason
    assert "int4 weight, DequantizeLinear → MatMul, QDQ, block 16" in groups["W4"].skip_reason
    assert groups["Wf"].skip_reason is None
