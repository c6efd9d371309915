"""Storage-mode autoencoder pass: weights of one module type across layers share a decoder.

Selected 2-D float initializers (``include`` regexes on their names) are grouped by shape and
role (the name with its digits replaced by ``#``, e.g. ``encoder.layer.#.attention.self.key.weight``);
each group with at least ``min_group`` weights is stacked row-wise, one storage AE is trained on
it (factorize/autoencoder.py), and each weight is replaced by a constant subgraph that decodes it
(graph/autoencoder.py). The model's other nodes are untouched. ``keep`` is the fraction of the
group's parameters that codes, norms and the shared decoder may use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..factorize.autoencoder import StorageAEConfig, storage_ae_width, train_storage_ae
from ..graph.autoencoder import rebuild_weights
from ..graph.edit import GraphEditor
from ..graph.index import FLOAT_TYPES, GraphIndex
from ..report import SiteReport

__all__ = ["StorageAEPass", "storage_groups"]


def storage_groups(index: GraphIndex, include: list[str], min_group: int = 2) -> tuple[dict, dict[str, str]]:
    """({(shape, role): [names]} for selected weights, {name: why skipped})."""
    pats = [re.compile(p) for p in include]
    groups: dict[tuple, list[str]] = {}
    skipped: dict[str, str] = {}
    for t in index.graph.initializer:
        if not any(p.search(t.name) for p in pats):
            continue
        ref = index.const(t.name)
        if ref is None:
            skipped[t.name] = "initializer is also a graph input"
        elif len(ref.dims) != 2 or ref.data_type not in FLOAT_TYPES:
            skipped[t.name] = "not a 2-D float tensor"
        elif index.is_used_outside_main(t.name):
            skipped[t.name] = "graph output or read inside a subgraph"
        elif not index.consumers.get(t.name):
            skipped[t.name] = "not read by any node"
        elif not np.isfinite(index.array(ref)).all():
            skipped[t.name] = "has NaN or Inf values: left untouched"
        else:
            groups.setdefault((tuple(ref.dims), re.sub(r"\d+", "#", t.name)), []).append(t.name)
    for key in [k for k, v in groups.items() if len(v) < min_group]:
        for name in groups.pop(key):
            skipped[name] = f"its group (shape and role) has fewer than {min_group} weights"
    return groups, skipped


@dataclass
class StorageAEPass:
    include: list[str]
    keep: float = 0.25
    min_group: int = 2
    options: dict = field(default_factory=dict)  # StorageAEConfig fields (epochs, lr, batch_size, ...)
    seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.keep < 1.0:
            raise ValueError(f"storage AE keep must be in (0, 1), got {self.keep}")
        try:
            [re.compile(p) for p in self.include]
        except re.error as e:
            raise ValueError(f"invalid regular expression {e.pattern!r}: {e}") from None
        try:
            StorageAEConfig(width=1, **self.options)
        except TypeError as e:
            raise ValueError(f"bad storage AE option: {e}") from None
        self.trained: dict[str, object] = {}  # group role -> StorageAE (for tests and benchmarks)

    def names(self, model: onnx.ModelProto) -> set[str]:
        """The weights this pass will take (so other passes leave them alone)."""
        groups, _ = storage_groups(GraphIndex(model), self.include, self.min_group)
        return {n for v in groups.values() for n in v}

    def run(self, model: onnx.ModelProto) -> list[SiteReport]:
        index = GraphIndex(model)
        editor = GraphEditor(model)
        groups, skipped = storage_groups(index, self.include, self.min_group)
        reports = []
        for name, why in skipped.items():
            ref = index.const(name)
            dims = tuple(ref.dims) if ref is not None else ()
            reports.append(SiteReport(weight=name, ops="storage", nodes=[], shape=dims,
                                      params_before=int(np.prod(dims)) if dims else 0, status="skipped", reason=why))
        for (shape, role), names in groups.items():
            arrays = [index.array(index.const(n)).astype(np.float64) for n in names]
            X = np.concatenate(arrays, axis=0)
            N, m = X.shape
            x = storage_ae_width(N, m, int(self.keep * N * m))
            if x < 1:
                for n in names:
                    reports.append(SiteReport(weight=n, ops="storage", nodes=[], shape=shape, params_before=shape[0] * shape[1],
                                              status="skipped", reason=f"storage AE keep {self.keep} leaves code width 0"))
                continue
            ae = train_storage_ae(X, StorageAEConfig(width=x, seed=self.seed, **self.options))
            self.trained[role] = ae
            stored = rebuild_weights(editor, index, names, [a.shape[0] for a in arrays], ae, role.replace("#", "x"))
            Xh = ae.reconstruct().astype(np.float64)
            start = 0
            for n, a, s in zip(names, arrays, stored):
                rows = Xh[start:start + a.shape[0]]
                start += a.shape[0]
                rel = float(np.linalg.norm(rows - a) / max(np.linalg.norm(a), 1e-30))
                reports.append(SiteReport(
                    weight=n, ops="storage", nodes=[c.name for c in index.consumers.get(n, [])], shape=shape,
                    params_before=a.size, status="rewritten", method="storage-ae", rank=x, params_after=s, rel_error=rel,
                    detail=f"shared decoder for {len(names)} weights ({ae.decoder.n_params:,} params, counted on the first), "
                           f"{ae.config.epochs} epochs, {ae.train_s:.1f} s"))
        editor.commit()
        return reports
