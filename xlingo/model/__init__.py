"""The Flax decoder and its attention."""
