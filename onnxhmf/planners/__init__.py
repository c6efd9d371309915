"""Planners: each turns options (and, where it measures, calibration data) into a Plan.

* ``uniform``: every weight gets the same keep or rank (data-free, or whitened with calibration).
* ``measured``: calibrated per-weight keeps from measured end-to-end losses (a knapsack), or the
  smallest keep meeting ``--min-fidelity``; ``--sequential`` assigns the fitting bands.
* ``mixed``: ``--plan auto``, per weight one treatment among dense, int8, weight-only int8/int4,
  LMF and LMF with int8 factors, under one byte budget or a fidelity target.
* ``replay``: a plan from a file, checked against the model.

A planner that assembled and measured the winning model hands it on (``Planned.built``), so
nothing is built twice.
"""
