"""``python -m benchmarks``: the same as the ``focal-bench`` console script."""

from benchmarks.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
