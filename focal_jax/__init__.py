"""focal_jax (under construction)."""
