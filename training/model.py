"""Swap-VAE (Liu et al., NeurIPS 2021): the network and its loss, as the paper writes them.

    encoder      x -> (c, mu, logvar)            content c is deterministic, style is variational
    sample       s = mu + exp(logvar / 2) * eps  (reparameterisation; content is not sampled)
    decoder      z = [c, s] -> rate              Softplus, so rates are non-negative
    BlockSwap    z~1 = [c2, s1] -> x1,  z~2 = [c1, s2] -> x2
    loss         L = L_rec + beta * KL + alpha * L_align
                 L_rec   = mean_i  rec(x_i, g(z_i)) + rec(x_i, g(z~_i))      (Poisson NLL)
                 KL      = KL(q(s | x) || N(0, I)), summed over dims
                 L_align = 2 - 2 cos(c1, c2)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(sizes: list[int]) -> list[nn.Module]:
    """Linear -> BatchNorm -> ReLU for each consecutive pair of ``sizes``."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
    return layers


class Encoder(nn.Module):
    def __init__(self, n_neurons: int, hidden: list[int], content_dim: int, style_dim: int):
        super().__init__()
        self.content_dim, self.style_dim = content_dim, style_dim
        self.net = nn.Sequential(*mlp([n_neurons, *hidden]), nn.Linear(hidden[-1], content_dim + 2 * style_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.net(x)
        c, mu, logvar = h.split([self.content_dim, self.style_dim, self.style_dim], dim=-1)
        return c, mu, logvar


class Decoder(nn.Module):
    def __init__(self, n_neurons: int, hidden: list[int], latent_dim: int):
        super().__init__()
        sizes = [latent_dim, *reversed(hidden)]  # mirrors the encoder: [128, 128, d] -> d
        self.net = nn.Sequential(*mlp(sizes), nn.Linear(sizes[-1], n_neurons), nn.Softplus())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def poisson_nll(x: torch.Tensor, rate: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """rec(x, rate) = sum over neurons of (rate - x log rate), mean over the batch."""
    return (rate - x * torch.log(rate + eps)).sum(-1).mean()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over dimensions, mean over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1).mean()


def alignment_loss(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """Normalised L2 between the two views' content: ||c1/|c1| - c2/|c2|||^2 = 2 - 2 cos(c1, c2)."""
    return (2 - 2 * F.cosine_similarity(c1, c2, dim=-1)).mean()


def block_swap(c1, s1, c2, s2) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents with the content blocks exchanged: z~1 = [c2, s1] (decodes to x1), z~2 = [c1, s2]."""
    return torch.cat([c2, s1], -1), torch.cat([c1, s2], -1)


class SwapVAENet(nn.Module):
    """The network and its loss (the scikit-learn estimator around it is swapvae.training.SwapVAE)."""

    def __init__(self, n_neurons: int, hidden: list[int], content_dim: int = 64, style_dim: int = 64):
        super().__init__()
        self.encoder = Encoder(n_neurons, hidden, content_dim, style_dim)
        self.decoder = Decoder(n_neurons, hidden, content_dim + style_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """The readout representation [c, mu]: no sampling."""
        c, mu, _ = self.encoder(x)
        return torch.cat([c, mu], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoised rates g([c, mu]) for a batch of bins."""
        return self.decoder(self.represent(x))

    def loss(self, x1: torch.Tensor, x2: torch.Tensor, swap: bool = True, kl_weight: float = 10.0,
             align_weight: float = 1.0, eps: float = 1e-8) -> dict[str, torch.Tensor]:
        """The terms of L for a batch of view pairs; both views share one encoder and one decoder
        pass (BatchNorm sees the views together, as it sees the batch)."""
        n = x1.shape[0]
        c, mu, logvar = self.encoder(torch.cat([x1, x2]))
        s = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        (c1, c2), (s1, s2) = c.split(n), s.split(n)
        z = [torch.cat([c, s], -1)]
        if swap:
            z += list(block_swap(c1, s1, c2, s2))
        rates = self.decoder(torch.cat(z))
        x = torch.cat([x1, x2])
        rec = poisson_nll(x, rates[: 2 * n], eps)  # mean over views of rec(x_i, g(z_i))
        if swap:
            rec = rec + poisson_nll(x, rates[2 * n:], eps)  # + rec(x_i, g(z~_i))
        kl = kl_divergence(mu, logvar)
        align = alignment_loss(c1, c2) if c.shape[-1] else torch.zeros((), device=x.device)
        return {"loss": rec + kl_weight * kl + align_weight * align, "rec": rec, "kl": kl, "align": align}
