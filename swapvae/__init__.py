"""The ``swapvae`` command, above both sides: training commands import ``training`` (the
[train] extra), serving commands only ``runtime`` and ``schemas``."""
