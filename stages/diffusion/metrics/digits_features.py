"""A small digits classifier as the feature space of a Frechet distance for generated
8x8 digits (no Inception, nothing downloaded), and its class statistics.

Images are [N, 1, H, W] (or [N, H*W]) floats in [-1, 1], the diffusion convention
(``stages.tasks.digits_images``: scikit-learn's 0..16 pixels map to ``x / 8 - 1``). The classifier resizes its input to
its own ``size`` (8, or 16 by bilinear upsampling), so it reads 8x8 and 16x16 samples.
Its ``features`` (the ReLU hidden layer before the head, ``NUM_FEATURES`` wide) are the
feature space; ``FeatureNet`` wraps it the way torchmetrics'
``FrechetInceptionDistance(feature=module)`` expects: forward(images) -> [N, d] with a
``num_features`` attribute (so torchmetrics does not probe it with a random uint8
image), and ``normalize=True`` so torchmetrics passes float images through untouched.

Training is seeded and takes a few seconds on one CPU thread (>0.95 test accuracy on
the repo's stratified digits split); ``save_digits_classifier`` / ``load_...`` keep it
in safetensors with its settings in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.diffusion.metrics.toy_modes import normalised_entropy
from stages.errors import DistilError

NUM_FEATURES = 64


class DigitsClassifier(nn.Module):
    """conv3x3(32) - conv3x3(64) - maxpool2 - linear(NUM_FEATURES) - linear(10), ReLUs."""

    def __init__(self, size: int = 8, num_features: int = NUM_FEATURES):
        super().__init__()
        if size not in (8, 16):
            raise DistilError(f"digits classifier size must be 8 or 16, got {size}")
        self.size = size
        self.num_features = num_features
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * (size // 2) ** 2, num_features)
        self.head = nn.Linear(num_features, 10)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, H, W] or [N, H*W] (square) -> [N, 1, size, size] float32."""
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.dim() == 2:
            side = int(round(x.shape[1] ** 0.5))
            if side * side != x.shape[1]:
                raise DistilError(f"images: {x.shape[1]} values per row is not a square image")
            x = x.view(-1, 1, side, side)
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]:
            raise DistilError(f"images: expected [N, 1, H, H] grey images, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.prepare(x)
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(h)))), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FeatureNet(nn.Module):
    """The classifier's features as torchmetrics' custom FID feature extractor."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def train_digits_classifier(
    images: Any, labels: Any, *, size: int = 8, epochs: int = 12, batch_size: int = 64, lr: float = 1e-3, seed: int = 0
) -> DigitsClassifier:
    """Adam on cross-entropy, seeded; a few seconds on one CPU thread."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(size)
    x = model.prepare(torch.as_tensor(images, dtype=torch.float32))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(x) != len(y) or len(y) < 10:
        raise DistilError(f"digits classifier: need matching images and labels (got {len(x)} and {len(y)})")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_proba(model: DigitsClassifier, images: Any, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    x = torch.as_tensor(images, dtype=torch.float32)
    return torch.cat([model(x[i : i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def digit_features(model: DigitsClassifier, images: Any, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    x = torch.as_tensor(images, dtype=torch.float32)
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()


def accuracy(model: DigitsClassifier, images: Any, labels: Any) -> float:
    return float((predict_proba(model, images).argmax(1) == np.asarray(labels)).mean())


@torch.no_grad()
def frechet_torchmetrics(model: DigitsClassifier, real: Any, fake: Any, batch_size: int = 1024) -> float:
    """Frechet distance of ``fake`` to ``real`` images in the classifier's feature space,
    computed by torchmetrics' ``FrechetInceptionDistance`` with ``FeatureNet`` as its
    custom feature module (float64 statistics; no torch-fidelity, no download)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=FeatureNet(model), normalize=True)
    for imgs, is_real in ((real, True), (fake, False)):
        x = torch.as_tensor(imgs, dtype=torch.float32)
        if len(x) < 2:
            raise DistilError(f"Frechet distance needs at least 2 {'real' if is_real else 'generated'} images, got {len(x)}")
        for i in range(0, len(x), batch_size):
            fid.update(x[i : i + batch_size], real=is_real)
    return float(fid.compute())


def class_coverage(model: DigitsClassifier, images: Any, *, min_share: float = 0.1) -> dict[str, Any]:
    """Mode coverage of digits by the classifier's predictions: ``class_entropy`` =
    H(predicted-class histogram) / log 10; ``classes_covered`` = classes predicted for at
    least ``min_share`` of their fair share n / 10; ``confidence`` = mean max probability."""
    p = predict_proba(model, images)
    counts = np.bincount(p.argmax(1), minlength=10)
    return {
        "class_entropy": normalised_entropy(counts, 10),
        "classes_covered": int((counts >= max(1.0, min_share * len(p) / 10)).sum()),
        "confidence": float(p.max(1).mean()),
        "class_counts": counts.tolist(),
    }


def class_conditional(model: DigitsClassifier, images: Any, labels: np.ndarray, real: Any, real_labels: np.ndarray,
                      min_rows: int = 4) -> dict[str, float]:  # fmt: skip
    """How well samples asked for class ``labels[i]`` are of that class: ``class_accuracy`` (the
    classifier predicts the asked class), and per class with at least ``min_rows`` samples and
    real images, the Frechet distance of its samples to the real train images of that class and
    their ``diversity`` (mean pairwise feature distance), each averaged over those classes
    (``fd_per_class``, ``diversity``; ``diversity_real`` is the same for the real images)."""
    from stages.diffusion.metrics.distances import _sq_dists, frechet_between

    images = np.asarray(images, np.float32)
    labels, real_labels = np.asarray(labels), np.asarray(real_labels)
    feats, real_feats = digit_features(model, images), digit_features(model, np.asarray(real, np.float32))
    out = {"class_accuracy": float((predict_proba(model, images).argmax(1) == labels).mean())}
    fds, div, div_real = [], [], []
    spread = lambda f: float(np.sqrt(np.maximum(_sq_dists(f, f), 0)).sum() / max(len(f) * (len(f) - 1), 1))  # noqa: E731
    for c in np.unique(labels):
        mine, theirs = feats[labels == c], real_feats[real_labels == c]
        if len(mine) >= min_rows and len(theirs) >= min_rows:
            fds.append(frechet_between(mine, theirs))
            div.append(spread(mine))
            div_real.append(spread(theirs))
    if fds:
        out.update(fd_per_class=float(np.mean(fds)), diversity=float(np.mean(div)), diversity_real=float(np.mean(div_real)))
    return out


def save_digits_classifier(model: DigitsClassifier, path: Path, info: dict[str, Any] | None = None) -> None:
    from stages.artifacts import save_tensors

    meta = {"size": model.size, "num_features": model.num_features, **(info or {})}
    save_tensors(Path(path), model.state_dict(), metadata={"distil.digits_classifier": json.dumps(meta)})


def load_digits_classifier(path: Path) -> DigitsClassifier:
    from safetensors import safe_open

    from stages.artifacts import load_tensors

    tensors = load_tensors(Path(path))
    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("distil.digits_classifier")
    if raw is None:
        raise DistilError(f"{path} is not a distil digits classifier (no 'distil.digits_classifier' metadata)")
    meta = json.loads(raw)
    model = DigitsClassifier(meta["size"], meta["num_features"])
    model.load_state_dict(tensors)
    return model.eval()
