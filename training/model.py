"""Swap-VAE (Liu et al., NeurIPS 2021): the network and its loss, as the paper writes them.

    encoder      x -> (c, mu, logvar)            content c is deterministic, style is variational
    sample       s = mu + exp(logvar / 2) * eps  (reparameterisation; content is not sampled)
    decoder      z = [c, s] -> rate              Softplus, so rates are non-negative
    BlockSwap    z~1 = [c2, s1] -> x1,  z~2 = [c1, s2] -> x2
    loss         L = L_rec + beta * KL + alpha * L_align
                 L_rec   = mean_i  rec(x_i, g(z_i)) + rec(x_i, g(z~_i))      (Poisson NLL)
                 KL      = KL(q(s | x) || N(0, I)), summed over dims
                 L_align = 2 - 2 cos(c1, c2)

    across sessions (beyond the paper; ``SharedCore``): each session s has its own read-in (the
    encoder's first Linear + BatchNorm, over its channels) and read-out (the decoder's last
    Linear, back to them); the layers between are one core, trained on every session's pairs.
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


def encoder_layers(n_neurons: int, hidden: list[int], content_dim: int, style_dim: int) -> list[nn.Module]:
    return [*mlp([n_neurons, *hidden]), nn.Linear(hidden[-1], content_dim + 2 * style_dim)]


def decoder_layers(n_neurons: int, hidden: list[int], latent_dim: int) -> list[nn.Module]:
    sizes = [latent_dim, *reversed(hidden)]  # mirrors the encoder: [128, 128, d] -> d
    return [*mlp(sizes), nn.Linear(sizes[-1], n_neurons), nn.Softplus()]


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal weights, zero biases (the released code's)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    def __init__(self, net: nn.Sequential, content_dim: int, style_dim: int):
        super().__init__()
        self.content_dim, self.style_dim, self.net = content_dim, style_dim, net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.net(x)
        c, mu, logvar = h.split([self.content_dim, self.style_dim, self.style_dim], dim=-1)
        return c, mu, logvar


class Decoder(nn.Module):
    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def poisson_nll(x: torch.Tensor, rate: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """rec(x, rate) = sum over neurons of (rate - x log rate), mean over the batch (in float32
    whatever the rates' precision: a bf16 log of small rates loses the counts' information)."""
    rate = rate.float()
    return (rate - x * torch.log(rate + eps)).sum(-1).mean()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over dimensions, mean over the batch (float32)."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(-1).mean()


def alignment_loss(c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """Normalised L2 between the two views' content: ||c1/|c1| - c2/|c2|||^2 = 2 - 2 cos(c1, c2) (float32)."""
    return (2 - 2 * F.cosine_similarity(c1.float(), c2.float(), dim=-1)).mean()


def block_swap(c1, s1, c2, s2) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents with the content blocks exchanged: z~1 = [c2, s1] (decodes to x1), z~2 = [c1, s2]."""
    return torch.cat([c2, s1], -1), torch.cat([c1, s2], -1)


class SwapVAENet(nn.Module):
    """The network and its loss (the scikit-learn estimator around it is swapvae.training.SwapVAE)."""

    def __init__(self, n_neurons: int, hidden: list[int], content_dim: int = 64, style_dim: int = 64):
        super().__init__()
        self._assemble(encoder_layers(n_neurons, hidden, content_dim, style_dim),
                       decoder_layers(n_neurons, hidden, content_dim + style_dim), content_dim, style_dim)
        init_weights(self)

    def _assemble(self, enc: list[nn.Module], dec: list[nn.Module], content_dim: int, style_dim: int) -> None:
        self.encoder = Encoder(nn.Sequential(*enc), content_dim, style_dim)
        self.decoder = Decoder(nn.Sequential(*dec))

    @classmethod
    def of_layers(cls, enc: list[nn.Module], dec: list[nn.Module], content_dim: int, style_dim: int) -> SwapVAENet:
        """A network of these very modules (shared, not copied): a session's view of a ``SharedCore``."""
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._assemble(enc, dec, content_dim, style_dim)
        return net

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


class SharedCore(nn.Module):
    """Swap-VAE across sessions: a read-in and a read-out per session around one core. With
    ``hidden = [H, ...]`` session s's network is ``SwapVAENet(d_s, hidden)`` whose layers from the
    encoder's second Linear to the decoder's second-last are the core's (``net(s)``: the same
    modules, so a session exports, saves and serves as a single-session model)."""

    def __init__(self, n_neurons: list[int], hidden: list[int], content_dim: int = 64, style_dim: int = 64):
        super().__init__()
        self.hidden, self.content_dim, self.style_dim = list(hidden), content_dim, style_dim
        self.core_encoder = nn.Sequential(*encoder_layers(1, hidden, content_dim, style_dim)[3:])
        self.core_decoder = nn.Sequential(*decoder_layers(1, hidden, content_dim + style_dim)[:-2])
        init_weights(self)
        self.read_in, self.read_out = nn.ModuleList(), nn.ModuleList()
        for d in n_neurons:
            self.add_session(d)

    def add_session(self, n_neurons: int) -> int:
        """A fresh read-in and read-out for a session of ``n_neurons`` channels; its index."""
        read_in = nn.Sequential(*encoder_layers(n_neurons, self.hidden, self.content_dim, self.style_dim)[:3])
        read_out = nn.Sequential(*decoder_layers(n_neurons, self.hidden, self.content_dim + self.style_dim)[-2:])
        init_weights(read_in)
        init_weights(read_out)
        self.read_in.append(read_in.to(self._device()))
        self.read_out.append(read_out.to(self._device()))
        return len(self.read_in) - 1

    def _device(self) -> torch.device:
        return next(self.core_encoder.parameters()).device

    def core(self) -> list[nn.Module]:
        return [self.core_encoder, self.core_decoder]

    def net(self, s: int) -> SwapVAENet:
        return SwapVAENet.of_layers([*self.read_in[s], *self.core_encoder], [*self.core_decoder, *self.read_out[s]],
                                    self.content_dim, self.style_dim)

    def loss(self, views: list[tuple[int, torch.Tensor, torch.Tensor]], swap: bool = True, kl_weight: float = 10.0,
             align_weight: float = 1.0, eps: float = 1e-8) -> dict[str, torch.Tensor]:
        """``SwapVAENet.loss`` for view pairs of several sessions, ``views`` = [(s, x1, x2)]: pairs
        (and so BlockSwap and the alignment) stay inside a session; the sessions' read-ins feed one
        pass of the core (its BatchNorm sees them together, as it sees both views), the read-outs
        take their own rows. With one session the terms equal ``net(s).loss(x1, x2)``."""
        k, sd = self.content_dim, self.style_dim
        rows = [2 * len(x1) for _, x1, _ in views]
        h = self.core_encoder(torch.cat([self.read_in[s](torch.cat([x1, x2])) for s, x1, x2 in views]))
        c, mu, logvar = h.split([k, sd, sd], dim=-1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        own, swapped, c1s, c2s = [], [], [], []
        for cc, zz, n in zip(c.split(rows), z.split(rows), rows):
            (c1, c2), (s1, s2) = cc.split(n // 2), zz.split(n // 2)
            own.append(torch.cat([cc, zz], -1))
            c1s.append(c1)
            c2s.append(c2)
            if swap:
                swapped.append(torch.cat(block_swap(c1, s1, c2, s2)))
        g = self.core_decoder(torch.cat(own + swapped))
        g_own, g_swapped = g[: sum(rows)].split(rows), g[sum(rows):].split(rows) if swap else [None] * len(rows)
        rec = torch.zeros((), device=h.device)
        for (s, x1, x2), a, b, n in zip(views, g_own, g_swapped, rows):
            x, share = torch.cat([x1, x2]), n / sum(rows)  # each term a mean over all rows of the batch
            rec = rec + share * poisson_nll(x, self.read_out[s](a), eps)
            if swap:
                rec = rec + share * poisson_nll(x, self.read_out[s](b), eps)
        kl = kl_divergence(mu, logvar)
        align = alignment_loss(torch.cat(c1s), torch.cat(c2s)) if k else torch.zeros((), device=h.device)
        return {"loss": rec + kl_weight * kl + align_weight * align, "rec": rec, "kl": kl, "align": align}
