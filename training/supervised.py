"""The supervised baseline: Swap-VAE's encoder architecture trained end to end on labels.

Encoder Linear(d, d) -> BN -> ReLU -> Linear(d, 128) -> BN -> ReLU -> Linear(128, rep_dim)
gives the representation (compared with Swap-VAE's [c, mu] by the same linear readouts);
a linear head on it predicts the reach direction (cross-entropy). The direction's angle is
that of the probability-weighted class unit vectors, as everywhere (``runtime.reach``).

Honest protocol: the number of epochs is chosen on a validation split carved from the
training trials (the last ``val_fraction``, chronologically), then the decoder is refitted
on all training bins for that many epochs. Optional generated samples (``augment``) are
added to whichever bins are being fitted, built only from those bins.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from swapvae.runtime.reach import angle_from_proba, class_angles, reach_scores
from swapvae.training.model import mlp

# rows of the fitted bins -> (generated counts over the kept neurons, their direction labels)
Augment = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class _Net(nn.Module):
    def __init__(self, n_in: int, hidden: list[int], rep_dim: int, n_classes: int):
        super().__init__()
        self.encoder = nn.Sequential(*mlp([n_in, *hidden]), nn.Linear(hidden[-1], rep_dim))
        self.head = nn.Linear(rep_dim, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


class SupervisedDecoder:
    def __init__(self, n_classes: int = 8, hidden: tuple[int | str, ...] = ("d", 128), rep_dim: int = 128,
                 lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 128, max_epochs: int = 200,
                 val_fraction: float = 0.2, seed: int = 0):
        self.n_classes, self.hidden, self.rep_dim = n_classes, hidden, rep_dim
        self.lr, self.weight_decay, self.batch_size = lr, weight_decay, batch_size
        self.max_epochs, self.val_fraction, self.seed = max_epochs, val_fraction, seed
        self.net_: _Net | None = None
        self.neurons_: np.ndarray | None = None
        self.epochs_: int | None = None
        self.val_curve_: list[float] = []

    @property
    def class_angles(self) -> np.ndarray:
        return class_angles(np.arange(self.n_classes), self.n_classes)

    def _x(self, counts: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(counts)[:, self.neurons_], dtype=torch.float32)

    def _train(self, x: np.ndarray, y: np.ndarray, epochs: int, val: tuple[np.ndarray, np.ndarray] | None = None):
        torch.manual_seed(self.seed)
        hidden = [x.shape[1] if h == "d" else int(h) for h in self.hidden]
        net = _Net(x.shape[1], hidden, self.rep_dim, self.n_classes)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
        steps = max(1, len(xt) // self.batch_size)
        curve = []
        for _ in range(epochs):
            net.train()
            perm = torch.randperm(len(xt), generator=gen)
            for k in range(steps):
                idx = perm[k * self.batch_size:(k + 1) * self.batch_size]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if val is not None:
                net.eval()
                with torch.no_grad():
                    p = torch.softmax(net(torch.as_tensor(val[0], dtype=torch.float32)), -1).numpy()
                curve.append(reach_scores(self._angle(p), val[1], self.n_classes))
        net.eval()
        return net, curve

    def _angle(self, proba: np.ndarray) -> np.ndarray:
        return angle_from_proba(proba, self.class_angles)

    def fit(self, counts: np.ndarray, target: np.ndarray, trial: np.ndarray, *, neurons: np.ndarray | None = None,
            augment: Augment | None = None) -> SupervisedDecoder:
        counts, target, trial = np.asarray(counts, dtype=np.float32), np.asarray(target), np.asarray(trial)
        self.neurons_ = np.arange(counts.shape[1]) if neurons is None else np.asarray(neurons)
        x = counts[:, self.neurons_]
        trials = np.unique(trial)  # chronological
        n_val = max(1, int(round(self.val_fraction * len(trials))))
        fit_rows = np.flatnonzero(~np.isin(trial, trials[-n_val:]))
        val_rows = np.flatnonzero(np.isin(trial, trials[-n_val:]))

        def with_generated(rows):
            if augment is None:
                return x[rows], target[rows]
            gx, gy = augment(rows)
            return np.concatenate([x[rows], gx]), np.concatenate([target[rows], gy])

        _, curve = self._train(*with_generated(fit_rows), self.max_epochs, val=(x[val_rows], target[val_rows]))
        self.val_curve_ = [acc for acc, _ in curve]
        # best (acc, delta-acc); the earliest epoch among ties, since more epochs only risk overfitting
        self.epochs_ = 1 + max(range(len(curve)), key=lambda e: (curve[e], -e))
        self.net_, _ = self._train(*with_generated(np.arange(len(x))), self.epochs_)
        return self

    @torch.no_grad()
    def transform(self, counts: np.ndarray, space: str = "full") -> np.ndarray:
        """The representation (the encoder's output); there is no content/style split."""
        if space != "full":
            raise ValueError("the supervised decoder has one representation space: 'full'")
        return self.net_.encoder(self._x(counts)).numpy()

    @torch.no_grad()
    def proba(self, counts: np.ndarray) -> np.ndarray:
        return torch.softmax(self.net_(self._x(counts)), -1).numpy()

    def angle(self, counts: np.ndarray) -> np.ndarray:
        return self._angle(self.proba(counts))

    def score(self, counts: np.ndarray, target: np.ndarray) -> tuple[float, float]:
        """(acc, delta-acc) by the paper's sector rule."""
        return reach_scores(self.angle(counts), np.asarray(target), self.n_classes)
