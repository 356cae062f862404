"""Configs: the shared defaults, loading of config files, and one place for config errors.

A config file is a Python module with ``get_config(arg=None) -> ConfigDict`` that starts from
:func:`base_config` and changes what it needs. Every loop reads the same sections:

- ``model``: the decoder's shape and numerics (see ``xlingo.model.decoder``).
- ``mesh``: device mesh shape over the axes ``data``, ``fsdp``, ``tensor`` and the logical
  axis rules that map parameter/activation axis names to mesh axes.
- ``data``: corpus, languages, sampling temperature, sequence length, vocabulary.
- ``train``: steps, batch size, optimizer and loss options.
- ``checkpoint``: how often and how many to keep, and ``init_from``.

The adaptation and distillation loops add their own sections (:func:`adapt_section`,
:func:`distill_section`), which their configs attach. Configs take the decoder's dimensions
from :data:`MODEL_SIZES` (:func:`set_model_size`) and read their ``:arg`` with
:func:`parse_arg`.
"""

from __future__ import annotations

import types

import ml_collections

from xlingo.errors import ConfigError

# The language table of the embedded corpus. A language's id is its index here; the model's
# language-embedding table has one row per entry. Order is fixed: appending is safe, reordering
# breaks checkpoints.
EMBEDDED_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "ru", "ja", "zh")
# The projection kernels LoRA adapts by default (attention and MLP, scanned or unrolled).
LORA_TARGETS = r"attn/(query|key|value|out)$|mlp/(gate|up|down)$"

# The decoder's dimensions by size name, smallest first (parameters at the shipped 8k
# vocabulary): the configs name a size instead of writing the six numbers out.
_SHAPE_KEYS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
MODEL_SIZES = {
    name: dict(zip(_SHAPE_KEYS, dims)) for name, dims in {
        "tiny": (64, 2, 4, 2, 16, 128),  # tests: compiles in seconds
        "mini": (64, 2, 4, 4, 16, 256),  # 0.66 M, the distillation student
        "small": (128, 4, 4, 4, 32, 512),  # 2.1 M, the experiments and distillation teacher
        "base": (256, 4, 4, 4, 64, 1024),  # ~6 M, base_config's and the adaptation runs'
        "large": (512, 4, 8, 8, 64, 2048),  # ~21 M, the CPU demo (configs/small.py)
        "1b": (2048, 18, 16, 16, 128, 5632),
        "8b": (4096, 32, 32, 8, 128, 16384),  # grouped-query attention: 8 KV heads
    }.items()
}


def set_model_size(model: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """Sets ``model``'s dimensions to :data:`MODEL_SIZES` ``[size]``; returns ``model``."""
  if size not in MODEL_SIZES:
    raise ConfigError(f"model size {size!r} is unknown; use one of {', '.join(MODEL_SIZES)}")
  model.update(MODEL_SIZES[size])
  return model


def parse_arg(arg, where: str, **spec) -> types.SimpleNamespace:
  """A config file's ``:arg`` -> its named values (big_vision's ``parse_arg``, positional).

  ``arg`` is ``V1,V2,...`` in the order of ``spec``'s keys; a value left out (or no arg at all)
  takes its default. Each spec says how to read its value: a float reads a number; a str is
  any string; a tuple lists the choices, its first the default, where a float element stands
  for any number and ``""`` for "no argument". Anything else is one ConfigError that names
  ``where`` (the config file) and the accepted form.
  """
  given = [p.strip() for p in str(arg).split(",")] if arg else []
  if len(given) > len(spec):
    raise ConfigError(f"{where}:{arg}: {'too many values; ' if spec else ''}{_form(where, spec)}")
  out = {}
  for i, (name, kind) in enumerate(spec.items()):
    default = kind[0] if isinstance(kind, tuple) else kind
    value = given[i] if i < len(given) and given[i] else default
    if not isinstance(kind, tuple):
      out[name] = _number(value, where, arg, name, spec) if isinstance(kind, float) else value
    elif value in kind:
      out[name] = value
    elif any(isinstance(k, float) for k in kind) and _is_number(value):
      out[name] = float(value)
    elif len(spec) == 1:
      raise ConfigError(f"{where}:{arg}: use {_alternatives(kind)}")
    elif any(isinstance(k, float) for k in kind):  # a number or one of the named choices
      names = " or ".join(repr(k) for k in kind if isinstance(k, str) and k)
      raise ConfigError(f"{where}:{arg}: {name} {value!r} is neither a {_label(name)} nor "
                        f"{names}; {_form(where, spec)}")
    else:
      raise ConfigError(f"{where}:{arg}: {name} {value!r} is unknown: use "
                        f"{_alternatives(kind)}; {_form(where, spec)}")
  return types.SimpleNamespace(**out)


def _is_number(value) -> bool:
  try:
    float(value)
  except ValueError:
    return False
  return True


def _number(value, where, arg, name, spec) -> float:
  if not _is_number(value):
    raise ConfigError(f"{where}:{arg}: {name} {value!r} is not a {_label(name)} (a number); "
                      f"{_form(where, spec)}")
  return float(value)


def _label(name: str) -> str:
  return name.replace("_", " ")


def _alternatives(kind: tuple) -> str:
  words = ["no argument" if k == "" else "a number" if isinstance(k, float) else repr(k)
           for k in kind]
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _form(where: str, spec: dict) -> str:
  names = [n.upper() for n in spec]
  optional = "".join(f"[,{n}" for n in names[1:]) + "]" * (len(names) - 1)
  return f"the form is {where}:{names[0]}{optional}" if names else "it takes no argument"


def base_config() -> ml_collections.ConfigDict:
  """The defaults of every section the loops read: the one place a default is written."""
  c = ml_collections.ConfigDict()
  c.model = _model_defaults()
  c.mesh = _mesh_defaults()
  c.data = _data_defaults()
  c.train = _train_defaults()
  c.checkpoint = _checkpoint_defaults()
  return c


def _model_defaults() -> ml_collections.ConfigDict:
  """``model``: the decoder's shape and numerics."""
  model = ml_collections.ConfigDict()
  model.vocab_size = 8192
  # d_model, num_layers, num_heads, num_kv_heads (< num_heads: grouped-query attention),
  # head_dim, mlp_dim: the "base" size
  set_model_size(model, "base")
  model.max_len = 256
  model.dropout_rate = 0.0
  model.use_lang_emb = True
  model.num_languages = len(EMBEDDED_LANGUAGES)
  model.tie_embeddings = True
  model.dtype = "bfloat16"  # compute dtype
  model.param_dtype = "float32"
  # none | full | save_qkv_proj | save_mlp_input | save_qkv_proj_mlp_input | save_attn_proj |
  # save_qkv_proj_mlp_input_mlp_up | offload_attn_proj | offload_qkv_proj_mlp_input |
  # dots_saveable (xlingo/model/decoder.py)
  model.remat_policy = "none"
  model.scan_layers = True
  # none | int8: int8 matmuls (forward and both gradient matmuls) in the blocks' attention
  # projections and MLP, through Qwix (xlingo/model/matmul.py); embeddings, the vocabulary
  # projection, norms and attention itself stay in model.dtype. Not a shape key: a checkpoint
  # trained one way restores the other.
  model.quantization = "none"
  model.lid_head = False  # auxiliary language-identification head
  # Per example (packed segment), the rate at which training hides the language hint (the
  # "unknown language", a zero language vector): the model learns to work without one
  # (generate --lang none), and the language-ID loss is taken where the hint is hidden.
  model.lang_emb_dropout = 0.0
  model.rope_theta = 10000.0
  # Llama 3's RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings); empty: none (xlingo.model.attention.rope_inv_freq).
  model.rope_scaling = ()
  model.norm_eps = 1e-6  # RMSNorm's epsilon (Llama 2/3 and SmolLM2 use 1e-5)
  model.qkv_bias = False  # biases on the query/key/value projections (Qwen2)
  # The tied output projection's scale on the hidden states: "rsqrt_d" (d_model**-0.5, which
  # keeps a from-scratch model's initial logits O(1)) or "none" (Hugging Face's tied models).
  model.tied_output_scale = "rsqrt_d"
  # The input id at position 0 of every segment (the shifted-in placeholder): 0 for xlingo's
  # own vocabularies, the tokenizer's BOS for an imported model (xlingo.hf).
  model.bos_id = 0
  # Standard deviation of the language-embedding rows at initialisation (and of appended
  # languages' rows); 0 starts them at zero, so an imported model is unchanged until trained.
  model.lang_emb_init_std = 0.1
  model.attention_impl = "auto"  # auto | plain | xla | cudnn | splash (auto: splash on TPU)
  # Classes of a linear task head on pooled hidden states (python -m xlingo.finetune sets it
  # from the task's labels with finetune.head='classifier'); 0: no head.
  model.task_classes = 0
  return model


def _mesh_defaults() -> ml_collections.ConfigDict:
  """``mesh``: the device mesh and the logical axis rules."""
  mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all remaining devices
  mesh.fsdp = 1
  mesh.tensor = 1
  # Logical axis name -> mesh axes. Activations use 'activation_*' names.
  mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("activation_batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("vocab", "tensor"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("languages", None),
      ("layers", None),
      # parameter-efficient adaptation (xlingo.model.peft): small, replicated
      ("lora_rank", None),
      ("adapter", None),
      ("prefix", None),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_mlp", "tensor"),
      ("activation_heads", "tensor"),
      ("activation_vocab", "tensor"),
  )
  return mesh


def _data_defaults() -> ml_collections.ConfigDict:
  """``data``: corpus, languages, sampling, rows, vocabulary."""
  data = ml_collections.ConfigDict()
  data.source = "embedded"  # embedded | files | tfds
  data.languages = EMBEDDED_LANGUAGES
  # Languages trained on (LM tasks); empty: all of data.languages.
  data.train_languages = ()
  data.translation_pairs = ()  # e.g. ("en-de",): conditional tasks, loss on targets only
  data.language_weights = ml_collections.ConfigDict()  # lang -> rate multiplier
  data.sampling = "temperature"  # temperature | unimax
  data.temperature = 3.33  # mT5's alpha = 0.3
  # Rates that move over the run: ((fraction of the run's tokens, temperature), ...), 1/T
  # linear between the points, e.g. ((0, 1.0), (1, 3.33)); empty: data.temperature throughout.
  # Needs data.group_size > 0 (groups are drawn on the host; xlingo/data/mixing.py).
  data.temperature_schedule = ()
  data.unimax_max_epochs = 4.0
  data.seq_len = 256
  # first_fit: whole examples, first row with room (~3% padding); concat: one token stream cut
  # into rows (no padding, an example may continue in the next row). xlingo/data/packing.py.
  data.packing = "first_fit"
  # Training mixtures sample groups of this many consecutive examples of one task and the host
  # tokenizes ~1024 examples at once (10x the per-example rate; xlingo/data/readers.py);
  # 0 samples single examples (tokenized on the host all the same).
  data.group_size = 64
  # Grouped input: groups are read (and their examples shuffled together, and tokenized in one
  # call) about this many examples at a time.
  data.examples_per_read = 4096
  data.vocab_path = ""  # empty: the shipped shared vocabulary
  data.seed = 0
  # Examples held per task by seqio's shuffle (grouped: in groups): TFDS tasks, and every task
  # with data.group_size=0. Grouped line files are read in a global permutation instead
  # (xlingo/data/lineindex.py).
  data.shuffle_buffer = 1024
  # Where the line files' offset indexes are kept across runs (local or gs://; one folder can
  # serve every host); "": built in each process (one pass per file). xlingo/data/lineindex.py
  data.line_index_dir = ""
  data.file_patterns = ml_collections.ConfigDict()  # lang -> glob, for source=files
  data.file_val_patterns = ml_collections.ConfigDict()  # lang -> glob (optional)
  # lang -> glob (optional): the language's test split, scored only by evaluate --split test
  data.file_test_patterns = ml_collections.ConfigDict()
  data.file_pair_patterns = ml_collections.ConfigDict()  # "en-sw" -> glob of TSV files
  # "en-sw" -> glob (optional, for a pair of file_pair_patterns): its validation pairs
  # (val/retrieval, BLEU/chrF in adaptation, evaluate --translate) and its test pairs
  # (evaluate --translate --split test), never trained on.
  data.file_pair_val_patterns = ml_collections.ConfigDict()
  data.file_pair_test_patterns = ml_collections.ConfigDict()
  data.jsonl_field = "text"
  data.tfds_name = ""  # "wiki40b" or "c4/multilingual", for source=tfds
  data.tfds_data_dir = ""  # required for source=tfds: where the prepared datasets live
  # Refuse to start when a language's planned passes over its data exceed this (0: no bound):
  # past a few epochs repeated text adds little (Muennighoff et al. 2023, "Scaling
  # Data-Constrained Language Models"), and a run that plans thousands has the wrong corpus.
  data.max_epochs = 0.0
  return data


def _train_defaults() -> ml_collections.ConfigDict:
  """``train``: steps, batch, optimizer, loss terms, cadence."""
  train = ml_collections.ConfigDict()
  train.steps = 100
  train.batch_size = 8  # global, in sequences
  train.microbatches = 1  # gradient accumulation
  train.seed = 0
  train.optimizer = "adamw"
  train.learning_rate = 3e-3
  train.warmup_steps = 10
  train.schedule = "cosine"  # cosine | constant
  train.min_lr_ratio = 0.1
  train.b1 = 0.9
  train.b2 = 0.95
  train.weight_decay = 0.1
  train.grad_clip = 1.0
  train.z_loss = 0.0
  # Sequence positions per chunk of the loss's vocabulary projection (losses.py): the
  # [B, T, V] float32 logits are never held whole, only [B, chunk, V]. 0: one chunk, which on
  # CPU is as fast or faster (docs/PERFORMANCE.md); the TPU configs chunk.
  train.loss_chunk_size = 0
  # lambda: the mean language-ID cross-entropy (model.lid_head) over the tokens that carry no
  # language hint (all tokens without model.use_lang_emb), added to the mean loss.
  train.lid_loss_weight = 0.0
  # Per-language weights of the LM loss (not of sampling, which is data.language_weights):
  # language -> weight, 1.0 for a language not listed. The main language weighs
  # main_language_weight instead (it may not also be listed). The loss stays divided by the
  # batch's token count, so a weight w counts each of that language's tokens w times.
  train.loss_weights = ml_collections.ConfigDict()
  train.main_language = ""
  train.main_language_weight = 1.0
  # Contrastive alignment (xlingo/training/contrastive.py): InfoNCE between the pooled hidden
  # states of parallel sentences, both directions, the other pairs of the global batch as
  # negatives; weight * that loss is added to the mean loss.
  train.contrastive = ml_collections.ConfigDict()
  train.contrastive.weight = 0.0  # beta; 0 with pairs set: retrieval is measured, not trained
  train.contrastive.pairs = ()  # parallel tasks, e.g. ("en-de", "en-fr"); val/retrieval/*
  train.contrastive.temperature = 0.05
  train.contrastive.layer = -1  # the block whose output is pooled (-1: the last)
  train.contrastive.pooling = "mean"  # mean | last
  train.contrastive.batch_size = 0  # pairs per step, global; 0: train.batch_size
  train.contrastive.max_len = 64  # tokens per sentence (BOS included); longer ones are cut
  train.contrastive.eval_pairs = 0  # validation pairs per task for retrieval; 0: all
  train.log_every = 10
  train.eval_every = 50
  train.eval_batches = 4
  # What validation (and xlingo.evaluate) scores per language. -1: the first
  # train.eval_batches packed batches (how many lines that is depends on the tokenizer);
  # 0: the whole validation split; N > 0: the split's first N bytes of whole lines (the same
  # text whatever the tokenizer; train.eval_batches is then not used). val/bytes/<lang>
  # reports the bytes scored.
  train.eval_max_bytes = -1
  # Validation lines longer than a row (data.seq_len tokens) are scored in sliding windows:
  # each later window re-reads this many tokens before the ones it scores (every token scored
  # once). 0: cut into rows that restart without context. Must be < data.seq_len.
  train.eval_context = 0
  train.peak_flops_per_device = 0.0  # 0: look the device kind up
  train.trainable = ".*"  # regex over parameter paths; the rest is frozen
  # (start, count): a jax.profiler trace of the `count` steps after step `start` (start >= 1;
  # step 1 warms up) in WORKDIR/profile (hooks.profiler); count 0: no trace.
  train.profile_steps = (0, 0)
  return train


def _checkpoint_defaults() -> ml_collections.ConfigDict:
  """``checkpoint``: how often, how many, where a run starts from."""
  checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = 50
  checkpoint.keep = 3
  checkpoint.init_from = ""
  # Resume from this step of the workdir instead of the latest (0: the latest), e.g. one from
  # before a divergence; the later steps are kept aside as <step>.superseded-<time>.
  checkpoint.restore_step = 0
  checkpoint.async_save = True
  # A save, metrics upload or lock update on storage that fails or stops answering (gs://: 429,
  # 503, dropped or stalled connections) is retried with backoff for this long, then the run
  # stops with one line naming the last good checkpoint and the command that resumes.
  checkpoint.storage_retry_s = 300.0
  return checkpoint


def tpu_pretrain_config(seq_len: int = 2048) -> ml_collections.ConfigDict:
  """``base_config`` with what every TPU pretraining config shares: a 32k vocabulary, bf16
  compute, scanned and fully rematerialised blocks, z-loss, a large shuffle buffer and the
  logging / evaluation / checkpoint cadence of a long run. The configs add dimensions, mesh,
  batch and schedule."""
  c = base_config()
  c.model.vocab_size = 32768
  c.model.max_len = seq_len
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  # Saving the blocks' matmul outputs costs tens of GiB per chip at 2048-token rows; full
  # recomputation keeps the activations to the residual stream.
  c.model.remat_policy = "full"
  c.data.seq_len = seq_len
  c.data.shuffle_buffer = 10_000
  c.train.warmup_steps = 2000
  c.train.z_loss = 1e-4
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.eval_batches = 16
  # One [rows, 512, 32768] float32 block of logits at a time instead of the whole row's
  # (docs/TPU.md has what each config needs per chip).
  c.train.loss_chunk_size = 512
  c.checkpoint.every_steps = 1000
  # A real corpus: mC4 (TFDS c4/multilingual, what mT5 trained on) holds tens to thousands of
  # billions of tokens in each of these languages (the mT5 paper's counts), so a 21-63B-token
  # run reads each well under once; wiki40b's ja and zh Wikipedias (under a million articles
  # each) would be read several times over at this temperature (an estimate; the start-of-run
  # table gives the figure). Prepare it with TFDS into a bucket and pass
  # --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets.
  c.data.source = "tfds"
  c.data.tfds_name = "c4/multilingual"
  c.data.temperature = 3.33  # mT5's alpha = 0.3
  c.data.max_epochs = 4.0
  return c


def adapt_section() -> ml_collections.ConfigDict:
  """The ``adapt`` section (``python -m xlingo.adapt``; configs/adapt_*.py attach it)."""
  a = ml_collections.ConfigDict()
  # What trains: full | freeze (train.trainable) | lora | adapter | prefix | lang_emb. The
  # frozen parameters get no gradient and no optimizer state (docs/ADAPTATION.md).
  a.mode = "full"
  a.target_language = ""  # early stopping and reports; empty: the first target
  a.l2_init_weight = 0.0  # lambda * ||theta - theta_0||^2 over the trained parameters
  a.replay_ratio = 0.0  # share of the mixture for the languages not adapted to
  a.early_stop_patience = 0  # evaluations without improvement; 0: never stop early
  a.bleu_examples = 8  # validation pairs translated greedily for BLEU/chrF
  a.max_decode_len = 32
  a.export_merged = ""  # directory for plain (LoRA-merged) params after training
  a.lora = ml_collections.ConfigDict()
  a.lora.rank = 8
  a.lora.alpha = 16.0  # the side path is scaled by alpha / rank
  a.lora.targets = LORA_TARGETS  # regex over kernel paths
  a.adapter = ml_collections.ConfigDict()
  a.adapter.bottleneck = 64  # width of each block's adapter
  a.adapter.per_language = False  # one adapter per language, chosen by the token's language id
  a.prefix = ml_collections.ConfigDict()
  a.prefix.length = 16  # learned key/value positions per layer
  return a


def finetune_section() -> ml_collections.ConfigDict:
  """The ``finetune`` section (``python -m xlingo.finetune``; configs/finetune_*.py attach it,
  with an ``adapt`` section for ``adapt.mode``)."""
  f = ml_collections.ConfigDict()
  f.task = "chapter"  # an embedded task (xlingo/data/corpus/tasks/) or a task directory
  f.train_languages = ("en",)  # labelled training data; model selection on their validation
  f.eval_languages = ()  # val/acc and test/acc languages; empty: every language of the task
  f.head = "classifier"  # classifier (linear head on pooled states) | verbalizer (label names)
  f.pool = "mean"  # classifier: mean (over the text's tokens) | last (the last token's state)
  f.max_len = 64  # tokens per example (BOS, text, prompt and label name); the text is cut
  f.prompt = " ::"  # verbalizer: between the text and the label name
  f.verbalizer_names = "same"  # verbalizer: label names in the example's language | en
  f.verbalizer_norm = "mean"  # verbalizer: a name's score is the mean | sum of its token log-probs
  f.patience = 0  # evaluations without a better training-language accuracy; 0: never stop
  return f


def distill_section(teacher_model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``distill`` section (``python -m xlingo.distill``) for a teacher shaped like
  ``teacher_model`` (a model section)."""
  d = ml_collections.ConfigDict()
  d.teacher_workdir = ""  # a teacher workdir (latest checkpoint) or a checkpoint step dir
  # 'checkpoint': the teacher's shape keys come from its checkpoint metadata; 'config': from
  # teacher_model, checked against the metadata. Other keys (dtype, max_len, ...) always
  # come from teacher_model.
  d.teacher_model_source = "checkpoint"
  d.teacher_model = ml_collections.ConfigDict(teacher_model.to_dict())
  d.teacher_model.dtype = "bfloat16"  # the teacher's forward pass
  d.teacher_model.remat_policy = "none"  # no backward pass through the teacher
  d.teacher_model.dropout_rate = 0.0
  d.alpha = 0.5  # weight of tau^2 * KL; 1 - alpha on the student's cross-entropy
  d.temperature = 2.0
  d.schedule = "constant"  # constant | linear (from alpha/temperature to *_end over train.steps)
  d.alpha_end = 0.5
  d.temperature_end = 2.0
  d.top_k = 0  # > 0: KL over the teacher's top-k logits only (see losses.kl_divergence)
  # a `python -m xlingo.distill dump` output directory: read the teacher's stored top-k logits
  # instead of running the teacher (needs distill.top_k = its k, or 0)
  d.teacher_logits = ""
  d.init_from_teacher_layers = ()  # e.g. (0, 2): student blocks copied from these teacher layers
  return d
