"""Defect / colour generators: :mod:`.base` holds the one ``__call__`` every windowed generator
shares (check inputs → crop window → ``_generate`` → feathered paste-back); each backend module
writes only its ``_generate``. The contract (``GeneratorInfo``, options) is :mod:`pipelines.generator`;
the name → class table is :mod:`pipelines.registry`."""
