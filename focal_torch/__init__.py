"""focal_torch (under construction)."""
