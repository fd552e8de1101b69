"""Offline side: load a session, fit Swap-VAE, evaluate, export a bundle."""
