"""The judge: a small CNN trained on the real digits that labels generated samples.

GAN-test accuracy (the share of class-conditional samples the judge labels as their
intended class) and Frechet distance in the judge's feature space both rest on it. The judge
works at the digits' native 8x8: any input is turned grey and area-resized to 8x8 first, so
a 16x16 sample is judged on the same information the real digit carried and high-frequency
sampling noise is averaged away. Training augments through a random 16x16 detour (random
upsampling mode, small affine jitter, noise, area back down) so that samples from models
trained on upsampled digits look like what the judge saw.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genscale.errors import UserError

INPUT_SIZE = 8
NUM_CLASSES = 10
# Bump when the architecture or the training recipe changes: cached weights of another
# version are retrained instead of loaded.
JUDGE_VERSION = 2  # 2: the split of the embedded digits shards
SEED = 0
EPOCHS = 25
BATCH_SIZE = 64


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (train_images, train_labels, test_images, test_labels).

    Images are uint8 N x 8 x 8 with value round(v * 255 / 16) (v in 0..16); labels int64.
    The split is the one the embedded ``digits`` shards are written with (genscale.data), so
    the judge never sees the held-out digits.
    """
    from sklearn.datasets import load_digits

    from genscale.data.builtin import SPLIT_SEED, TEST_FRACTION
    from genscale.data.writer import split_indices

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, test_idx = split_indices(len(labels), TEST_FRACTION, SPLIT_SEED, labels)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


# Datasets a judge can be trained for: name -> split function of the shape above.
DATASETS = {"digits": digits_split}


def to_judge_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Images in either harness or disk convention -> float32 NCHW tensor in [-1, 1].

    uint8 arrays/tensors are the on-disk convention: N x H x W x C (or N x H x W), 0..255.
    Floating-point ones are the harness convention: N x C x H x W (or N x H x W), [-1, 1].
    """
    x = images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1 if x.dtype == torch.uint8 else 1)
    if x.ndim != 4:
        raise UserError(f"Images must have 3 or 4 dimensions, got shape {tuple(x.shape)}.")
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if not x.is_floating_point():
        raise UserError(f"Images must be uint8 (NHWC) or float (NCHW), got {x.dtype}.")
    return x.float()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average down to ``size`` (exact block means when it divides); bilinear up."""
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] >= size and x.shape[-2] >= size:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class Judge(nn.Module):
    """CNN classifier of 8x8 grey digits; accepts [-1, 1] NCHW images of any size and channels."""

    feature_dim = 128

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4 -> 2
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, self.feature_dim), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.test_accuracy: float | None = None  # filled by training or by the cache

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Grey (mean over channels) and area-resized to the judge's 8x8 input."""
        return _resize(x.float().mean(dim=1, keepdim=True), INPUT_SIZE)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, (N, 128): the space judge-feature FID is measured in."""
        return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """8x8 real digits -> 8x8 digits that went through what a generator's 16x16 output does.

    Upsample to 16 with a random mode (the data pipeline's choice is not known here), jitter by
    a small random affine map (rotation, scale, shift up to 1.5 px at 16), add noise, clamp and
    area-average back to 8x8.
    """
    n = x.shape[0]
    mode = ["nearest", "bilinear", "bicubic"][int(torch.randint(3, (1,), generator=gen))]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    big = F.interpolate(x, size=(16, 16), mode=mode, **kwargs).clamp(-1, 1)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * (12 * np.pi / 180)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1.5 * 2 / 16)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(big.shape), align_corners=False)
    # Shift to [0, 2] so that zero padding outside the digit is the black background.
    big = F.grid_sample(big + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * 0.15
    big = (big + sigma * torch.randn(big.shape, generator=gen)).clamp(-1, 1)
    return F.adaptive_avg_pool2d(big, INPUT_SIZE)


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray | torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Predicted classes (int64, N) of images in either convention (see ``to_judge_input``)."""
    x = to_judge_input(images)
    device = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    out = [judge(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    judge.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def train_judge(dataset: str = "digits", epochs: int = EPOCHS, seed: int = SEED) -> Judge:
    """Train a judge on the dataset's training split (CPU, deterministic for a given seed).

    Sets ``judge.test_accuracy`` to its accuracy on the held-out split (un-augmented).
    The global RNG is left untouched.
    """
    if dataset not in DATASETS:
        raise UserError(f"No judge for dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}.")
    train_x, train_y, test_x, test_y = DATASETS[dataset]()
    x = to_judge_input(train_x)
    y = torch.as_tensor(train_y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        judge = Judge()
        opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
        steps = epochs * ((len(x) + BATCH_SIZE - 1) // BATCH_SIZE)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        judge.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), BATCH_SIZE):
                idx = order[i:i + BATCH_SIZE]
                # A quarter of the samples stay clean so the exact real digits are seen too.
                xb = x[idx]
                aug = torch.rand(len(idx), generator=gen) < 0.75
                xb = torch.where(aug[:, None, None, None], _augment(xb, gen), xb)
                loss = F.cross_entropy(judge(xb), y[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    judge.eval()
    judge.test_accuracy = float((predict(judge, test_x) == test_y).mean())
    return judge


def default_cache_dir() -> Path:
    """``$GENSCALE_CACHE`` if set, else ~/.cache/genscale."""
    env = os.environ.get("GENSCALE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "genscale"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(weights: Path, info: Path) -> Judge | None:
    try:
        meta = json.loads(info.read_text())
        if meta.get("version") != JUDGE_VERSION:
            return None
        judge = Judge()
        judge.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        judge.test_accuracy = float(meta["test_accuracy"])
    except Exception:  # noqa: BLE001 -- torch.load/json raise many types on a bad file
        # A missing, stale or corrupt cache is rebuilt, never fatal.
        return None
    return judge.eval()


def load_or_train_judge(dataset: str = "digits", cache_dir: str | os.PathLike | None = None) -> Judge:
    """The judge for ``dataset``, from ``<cache>/judges/<dataset>.pt`` or trained and cached.

    ``<cache>`` is ``cache_dir`` or ``default_cache_dir()``. Next to the weights,
    ``<dataset>.json`` records the test accuracy and the judge version; it is written last, so
    its presence means the weights are complete. Returned on CPU in eval mode, with
    ``test_accuracy`` set.
    """
    if dataset not in DATASETS:
        raise UserError(f"No judge for dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}.")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights, info = folder / "judges" / f"{dataset}.pt", folder / "judges" / f"{dataset}.json"
    judge = _load_cached(weights, info)
    if judge is not None:
        return judge
    start = time.perf_counter()
    judge = train_judge(dataset)
    meta = {
        "dataset": dataset,
        "version": JUDGE_VERSION,
        "test_accuracy": judge.test_accuracy,
        "epochs": EPOCHS,
        "seed": SEED,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    _atomic_write(weights, lambda p: torch.save(judge.state_dict(), p))
    _atomic_write(info, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return judge


def judge_accuracy(
    judge: Judge, images: np.ndarray | torch.Tensor, intended_labels: np.ndarray | torch.Tensor
) -> dict:
    """How often the judge labels each image as its intended class.

    ``images``: uint8 NHWC (0..255) or float NCHW in [-1, 1], any size and channel count.
    Returns ``accuracy`` (float), ``per_class`` ({class: accuracy} for the intended classes
    present), ``histogram`` (list of predicted-class counts, one per class) and ``num``.
    """
    labels = np.asarray(intended_labels).astype(np.int64).reshape(-1)
    num_classes = judge.head.out_features
    if len(labels) != len(images):
        raise UserError(f"Got {len(images)} images but {len(labels)} labels.")
    if len(labels) == 0:
        raise UserError("There are no images to judge.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"Intended labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}.")
    pred = predict(judge, images)
    hit = pred == labels
    return {
        "accuracy": float(hit.mean()),
        "per_class": {int(c): float(hit[labels == c].mean()) for c in np.unique(labels)},
        "histogram": np.bincount(pred, minlength=num_classes).tolist(),
        "num": int(len(labels)),
    }
