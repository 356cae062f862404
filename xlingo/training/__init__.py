"""Training: losses, state, the loop."""
