"""tailrank bench (in progress)."""
