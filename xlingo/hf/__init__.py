"""Hugging Face interop: Llama-family checkpoints in and out of xlingo.

``python -m xlingo.hf import`` turns a Hugging Face model directory (or a GGUF file) into an
xlingo workdir that ``checkpoint.init_from`` and the tools load; ``python -m xlingo.hf export``
turns an xlingo workdir back into a directory that ``transformers`` loads. The pieces:

- ``layout``: the Hugging Face config and tensor names <-> xlingo's model section and parameter
  tree, one table read both ways.
- ``sources``: the tensors of a safetensors model (single or sharded) or a GGUF file, read a
  slice at a time into sharded ``jax.Array``s.
- ``gguf_file``: GGUF metadata, dequantisation and its tokenizer.
- ``importer`` and ``exporter``: the two commands. docs/HF.md has what maps to what and why.
"""
