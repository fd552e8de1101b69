"""The ``swapvae`` sub-commands: each module registers its parsers (``register(sub)``) and holds
the adapters from command-line flags to the library's keyword arguments. They import argparse
and the standard library at the top, and their side of the library only when run, so the
parser builds without torch or ONNX Runtime and ``swapvae serve`` never imports training."""
from swapvae.commands import admin, calibrate, convert, export, keygen, play, replay, report, serve, sweep, train

MODULES = (train, calibrate, sweep, export, serve, replay, play, admin, keygen, report, convert)
