"""The atlas's t-SNE embedding of head descriptors (scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler


def tsne_embedding(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[n, 2]``: scikit-learn's t-SNE of the standardised ``features [n, F]`` (PCA start, perplexity
    ``min(30, (n − 1) / 3)``, seeded): the atlas's baseline embedding."""
    from sklearn.manifold import TSNE

    x = StandardScaler().fit_transform(features.double().numpy())
    perplexity = max(1.0, min(30.0, (x.shape[0] - 1) / 3))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return torch.from_numpy(np.ascontiguousarray(points)).float()
