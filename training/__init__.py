"""Offline side: load a session, fit Swap-VAE, evaluate, export a bundle.

``from swapvae.training import SwapVAE`` is the scikit-learn estimator (``training.estimator``),
imported on first use so that ``training.data`` alone stays free of torch."""


def __getattr__(name: str):
    if name == "SwapVAE":
        from swapvae.training.estimator import SwapVAE

        return SwapVAE
    raise AttributeError(f"module 'training' has no attribute {name!r}")
