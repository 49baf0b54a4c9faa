"""parity_tests (under construction)."""
