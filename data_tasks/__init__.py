"""SeqIO registrations. Each module registers tasks for one kind of corpus.

A module here exposes ``register(data_cfg, vocab, prefix) -> Registered``; the config's
``data.source`` names the module (``embedded``, ``files`` or ``tfds_corpora``). Importing
``data_tasks.embedded`` also registers the embedded corpus with the shipped vocabulary under
the ``xlingo.`` prefix, so ``seqio.get_mixture_or_task("xlingo.lm.de")`` works at once.
"""
