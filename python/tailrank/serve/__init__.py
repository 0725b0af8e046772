"""tailrank serve (in progress)."""
