"""The command-line front end (``python -m studio``, parser in :mod:`studio.__main__`): one module
per command group (dataset, plans, generation, evaluation, training), each with its
``add_commands(sub, ws)``; workspace.py (the store of ``--workspace``), progress.py (progress bars)."""
