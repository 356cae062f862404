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
:func:`distill_section`), which their configs attach.
"""

from __future__ import annotations

import ml_collections

from xlingo.errors import ConfigError  # noqa: F401 - the name config files use

# The language table of the embedded corpus. A language's id is its index here; the model's
# language-embedding table has one row per entry. Order is fixed: appending is safe, reordering
# breaks checkpoints.
EMBEDDED_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "ru", "ja", "zh")
# The projection kernels LoRA adapts by default (attention and MLP, scanned or unrolled).
LORA_TARGETS = r"attn/(query|key|value|out)$|mlp/(gate|up|down)$"


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 8192
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 4  # < num_heads gives grouped-query attention
  c.model.head_dim = 64
  c.model.mlp_dim = 1024
  c.model.max_len = 256
  c.model.dropout_rate = 0.0
  c.model.use_lang_emb = True
  c.model.num_languages = len(EMBEDDED_LANGUAGES)
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"  # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat_policy = "none"  # none | full | dots_saveable
  c.model.scan_layers = True
  c.model.lid_head = False  # auxiliary language-identification head
  # Per example (packed segment), the rate at which training hides the language hint (the
  # "unknown language", a zero language vector): the model learns to work without one
  # (generate --lang none), and the language-ID loss is taken where the hint is hidden.
  c.model.lang_emb_dropout = 0.0
  c.model.rope_theta = 10000.0
  c.model.attention_impl = "auto"  # auto | plain | xla | cudnn | splash (auto: splash on TPU)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical axis name -> mesh axes. Activations use 'activation_*' names.
  c.mesh.rules = (
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

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded"  # embedded | files | tfds
  c.data.languages = EMBEDDED_LANGUAGES
  # Languages trained on (LM tasks); empty: all of data.languages.
  c.data.train_languages = ()
  c.data.translation_pairs = ()  # e.g. ("en-de",): conditional tasks, loss on targets only
  c.data.language_weights = ml_collections.ConfigDict()  # lang -> rate multiplier
  c.data.sampling = "temperature"  # temperature | unimax
  c.data.temperature = 3.33  # mT5's alpha = 0.3
  # Rates that move over the run: ((fraction of the run's tokens, temperature), ...), 1/T
  # linear between the points, e.g. ((0, 1.0), (1, 3.33)); empty: data.temperature throughout.
  # Needs data.group_size > 0 (groups are drawn on the host; xlingo/data/mixing.py).
  c.data.temperature_schedule = ()
  c.data.unimax_max_epochs = 4.0
  c.data.seq_len = 256
  # first_fit: whole examples, first row with room (~3% padding); concat: one token stream cut
  # into rows (no padding, an example may continue in the next row). xlingo/data/packing.py.
  c.data.packing = "first_fit"
  # Training mixtures sample groups of this many consecutive examples of one task and the host
  # tokenizes ~1024 examples at once (10x the per-example rate; xlingo/data/readers.py);
  # 0 samples single examples (tokenized on the host all the same).
  c.data.group_size = 64
  # Grouped input: groups are read (and their examples shuffled together, and tokenized in one
  # call) about this many examples at a time.
  c.data.examples_per_read = 4096
  c.data.vocab_path = ""  # empty: the shipped shared vocabulary
  c.data.seed = 0
  c.data.shuffle_buffer = 1024  # examples held per task by seqio's shuffle (grouped: in groups)
  c.data.file_patterns = ml_collections.ConfigDict()  # lang -> glob, for source=files
  c.data.file_val_patterns = ml_collections.ConfigDict()  # lang -> glob (optional)
  c.data.file_pair_patterns = ml_collections.ConfigDict()  # "en-sw" -> glob of TSV files
  c.data.jsonl_field = "text"
  c.data.tfds_name = ""  # "wiki40b" or "c4/multilingual", for source=tfds
  c.data.tfds_data_dir = ""  # required for source=tfds: where the prepared datasets live
  # Refuse to start when a language's planned passes over its data exceed this (0: no bound):
  # past a few epochs repeated text adds little (Muennighoff et al. 2023, "Scaling
  # Data-Constrained Language Models"), and a run that plans thousands has the wrong corpus.
  c.data.max_epochs = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 8  # global, in sequences
  c.train.microbatches = 1  # gradient accumulation
  c.train.seed = 0
  c.train.optimizer = "adamw"
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 10
  c.train.schedule = "cosine"  # cosine | constant
  c.train.min_lr_ratio = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.train.z_loss = 0.0
  # Sequence positions per chunk of the loss's vocabulary projection (losses.py): the
  # [B, T, V] float32 logits are never held whole, only [B, chunk, V]. 0: one chunk, which on
  # CPU is as fast or faster (docs/PERFORMANCE.md); the TPU configs chunk.
  c.train.loss_chunk_size = 0
  # lambda: the mean language-ID cross-entropy (model.lid_head) over the tokens that carry no
  # language hint (all tokens without model.use_lang_emb), added to the mean loss.
  c.train.lid_loss_weight = 0.0
  # Per-language weights of the LM loss (not of sampling, which is data.language_weights):
  # language -> weight, 1.0 for a language not listed. The main language weighs
  # main_language_weight instead (it may not also be listed). The loss stays divided by the
  # batch's token count, so a weight w counts each of that language's tokens w times.
  c.train.loss_weights = ml_collections.ConfigDict()
  c.train.main_language = ""
  c.train.main_language_weight = 1.0
  # Contrastive alignment (xlingo/training/contrastive.py): InfoNCE between the pooled hidden
  # states of parallel sentences, both directions, the other pairs of the global batch as
  # negatives; weight * that loss is added to the mean loss.
  c.train.contrastive = ml_collections.ConfigDict()
  c.train.contrastive.weight = 0.0  # beta; 0 with pairs set: retrieval is measured, not trained
  c.train.contrastive.pairs = ()  # parallel tasks, e.g. ("en-de", "en-fr"); val/retrieval/*
  c.train.contrastive.temperature = 0.05
  c.train.contrastive.layer = -1  # the block whose output is pooled (-1: the last)
  c.train.contrastive.pooling = "mean"  # mean | last
  c.train.contrastive.batch_size = 0  # pairs per step, global; 0: train.batch_size
  c.train.contrastive.max_len = 64  # tokens per sentence (BOS included); longer ones are cut
  c.train.contrastive.eval_pairs = 0  # validation pairs per task for retrieval; 0: all
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.peak_flops_per_device = 0.0  # 0: look the device kind up
  c.train.trainable = ".*"  # regex over parameter paths; the rest is frozen

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 3
  c.checkpoint.init_from = ""
  # Resume from this step of the workdir instead of the latest (0: the latest), e.g. one from
  # before a divergence; the later steps are kept aside as <step>.superseded-<time>.
  c.checkpoint.restore_step = 0
  c.checkpoint.async_save = True
  # A save, metrics upload or lock update on storage that fails or stops answering (gs://: 429,
  # 503, dropped or stalled connections) is retried with backoff for this long, then the run
  # stops with one line naming the last good checkpoint and the command that resumes.
  c.checkpoint.storage_retry_s = 300.0
  return c


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
  d.init_from_teacher_layers = ()  # e.g. (0, 2): student blocks copied from these teacher layers
  return d
