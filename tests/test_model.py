import math

import torch

from swapvae.training.model import SwapVAENet, alignment_loss, block_swap, kl_divergence, poisson_nll


def test_poisson_nll_hand_computed():
    x = torch.tensor([[0.0, 2.0], [1.0, 3.0]])
    rate = torch.tensor([[0.5, 2.0], [1.0, 4.0]])
    # per bin: sum(rate - x log rate)
    bin0 = 0.5 - 0.0 + 2.0 - 2.0 * math.log(2.0)
    bin1 = 1.0 - 0.0 + 4.0 - 3.0 * math.log(4.0)
    assert math.isclose(poisson_nll(x, rate, eps=0.0).item(), (bin0 + bin1) / 2, rel_tol=1e-6)


def test_kl_hand_computed():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * sum(mu^2 + var - 1 - log var)
    expected = 0.5 * (1.0 + 0.0) + 0.5 * (2.0 - 1.0 - math.log(2.0))
    assert math.isclose(kl_divergence(mu, logvar).item(), expected, rel_tol=1e-6)
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_alignment_is_normalised_l2():
    c1 = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    c2 = torch.tensor([[0.0, 5.0], [2.0, 2.0]])
    # orthogonal -> 2, parallel (any scale) -> 0
    assert math.isclose(alignment_loss(c1, c2).item(), (2.0 + 0.0) / 2, abs_tol=1e-6)
    n1, n2 = c1 / c1.norm(dim=1, keepdim=True), c2 / c2.norm(dim=1, keepdim=True)
    assert math.isclose(alignment_loss(c1, c2).item(), ((n1 - n2) ** 2).sum(1).mean().item(), abs_tol=1e-6)


def test_block_swap_exchanges_content_only():
    c1, s1, c2, s2 = (torch.full((2, 3), float(v)) for v in (1, 2, 3, 4))
    z1t, z2t = block_swap(c1, s1, c2, s2)
    assert torch.equal(z1t, torch.cat([c2, s1], -1))  # decodes to x1: other view's content, own style
    assert torch.equal(z2t, torch.cat([c1, s2], -1))


def test_loss_decodes_each_view_with_the_other_views_content(monkeypatch):
    torch.manual_seed(0)
    model = SwapVAENet(n_neurons=6, hidden=[6, 5], content_dim=2, style_dim=3)
    seen = []
    monkeypatch.setattr(model.decoder, "forward", lambda z: seen.append(z.detach()) or torch.ones(len(z), 6))
    x1, x2 = torch.rand(4, 6), torch.rand(4, 6)
    model.loss(x1, x2)
    z = seen[0]
    assert z.shape == (16, 5)  # [z1; z2; z~1; z~2], one decoder pass
    c, _, _ = model.encoder(torch.cat([x1, x2]))
    c1, c2 = c[:4].detach(), c[4:].detach()
    model.train()
    assert torch.allclose(z[8:12, :2], c2, atol=1e-5)  # z~1 carries c2
    assert torch.allclose(z[12:, :2], c1, atol=1e-5)  # z~2 carries c1
    assert torch.allclose(z[8:12, 2:], z[:4, 2:])  # ... and view 1's own style sample


def test_no_swap_decodes_only_own_latents(monkeypatch):
    model = SwapVAENet(n_neurons=6, hidden=[6, 5], content_dim=2, style_dim=3)
    seen = []
    monkeypatch.setattr(model.decoder, "forward", lambda z: seen.append(z) or torch.ones(len(z), 6))
    out = model.loss(torch.rand(4, 6), torch.rand(4, 6), swap=False)
    assert seen[0].shape[0] == 8
    assert set(out) == {"loss", "rec", "kl", "align"}


def test_rates_non_negative_and_inference_deterministic():
    model = SwapVAENet(n_neurons=7, hidden=[7, 5], content_dim=2, style_dim=2).eval()
    x = torch.rand(3, 7) * 5
    r1, r2 = model(x), model(x)
    assert (r1 >= 0).all() and torch.equal(r1, r2)  # no sampling at inference
