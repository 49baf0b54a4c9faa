"""``python -m focal_bench``: the same as the ``focal-bench`` console script."""

from focal_bench.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
