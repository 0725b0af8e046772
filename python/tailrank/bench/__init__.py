"""Benchmark machinery shared by ``tailrank bench`` and the project's own suites (benchmarks/).

Modules: ``machine`` (machine facts), ``measure`` (timing and percentiles), ``floor`` (FLOPs and
matmul rates), ``peers`` (the systems compared), ``fidelity`` (ranking agreement), ``quality``
(pytrec_eval), ``workload`` (BEIR workloads and the first stage), ``models`` (export and optimize
caches), ``report`` (JSON, markdown, plots), ``serve`` (serve-mode load) and ``suite`` (the
``tailrank bench`` run). Heavy dependencies (torch, matplotlib, pytrec_eval, peers) are imported
only where used.
"""
