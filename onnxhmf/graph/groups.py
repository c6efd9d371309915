"""What a site is: a Use (one node reading a weight) and a WeightGroup (one stored constant with
all its uses). Found by sites.find_weight_groups (float weights) and quantized.py (weights
that come quantized)."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .index import ConstRef

__all__ = ["Use", "WeightGroup"]


@dataclass
class Use:
    """One node reading the weight T (stored m×n).

    kind: "matmul" (Y = X·W), "gemm" (Y = α·X·W + β·C) or "gather" (Y = T[ids]).
    transposed: the node multiplies by Tᵀ instead of T (via a Transpose node, Gemm's transB,
    or both, which cancel).
    """

    node: onnx.NodeProto
    kind: str
    transposed: bool
    via_transpose: str | None = None  # name of the Transpose output the node reads, if any
    scope: str = ""  # path of the graph that holds the node ("" = the main graph)


@dataclass
class WeightGroup:
    ref: ConstRef
    uses: list[Use] = field(default_factory=list)
    skip_reason: str | None = None
    label: str | None = None  # "<scope>::<name>" when bodies hold several tensors of this name

    @property
    def name(self) -> str:
        return self.label or self.ref.name

    @property
    def shape(self) -> tuple[int, int]:
        return self.ref.dims  # type: ignore[return-value]

    @property
    def params(self) -> int:
        m, n = self.shape
        return m * n

    @property
    def ops(self) -> str:
        return "+".join(sorted({u.kind for u in self.uses})) or "-"

    @property
    def node_names(self) -> list[str]:
        return [u.node.name for u in self.uses]
