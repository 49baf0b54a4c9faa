"""Speed and memory harness for focal_jax and focal_torch against their peers.

Run ``focal-bench`` (or ``python -m focal_bench``); ``focal-bench --help`` lists the options.
Results of a recorded run are in ``BENCHMARKS.md`` and ``focal_bench/results/``.
"""
