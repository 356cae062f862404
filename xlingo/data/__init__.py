"""The data layer: text to sharded batches, by stage (see the modules' docstrings)."""
