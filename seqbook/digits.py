r"""Small images shipped inside the package: 8x8 handwritten digits, read as sequences of pixels.

Chapter 8 asks whether the sequence models of the book do anything beyond text, as Vision Mamba
(Zhu et al. 2024) and MedMamba (Yue & Li 2024) do with images: cut the image into patches, lay them
out in an order, and scan. Here a patch is one pixel and the image is 8x8, so a digit is a sequence
of 64 grey levels. Nothing is downloaded: the data is a file in ``seqbook/data/``.

**Provenance.** ``seqbook/data/digits.csv.gz`` is the UCI "Optical Recognition of Handwritten
Digits" data set (E. Alpaydin and C. Kaynak, 1998; its *test* part: 1797 images written by 13
people), licensed CC BY 4.0, https://doi.org/10.24432/C50P49. The file is byte for byte the copy
that scikit-learn ships as ``sklearn/datasets/data/digits.csv.gz`` (taken from the scikit-learn
1.9.1 wheel; sha256 ``09f66e6d...51e23aa22``, see :data:`SHA256`); scikit-learn is *not* a
dependency. Each line is 64 pixel counts (0..16: the number of black pixels in a 4x4 block of the
original 32x32 bitmap), row by row, then the label 0..9.

Glossary (symbol -> shape)
--------------------------
::

    images   (1797, 8, 8)     float32 grey levels in [0, 1] (counts / 16)
    labels   (1797,)          int64 digit 0..9
    order    (64,)            int64: order[t] = the pixel (row-major index r * 8 + c) read at step t
    x        (n, L, p*p [+L]) the images as sequences of L = (8/p)^2 patches of p x p pixels (p = patch),
                              optionally with a one-hot position, ready for SequenceModel
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import torch

#: sha256 of the shipped file (checked on load: a corrupted copy fails loudly).
SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
SIDE = 8
N_CLASSES = 10
ORDERS = ("row", "snake", "column", "hilbert", "random")


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``images (1797, 8, 8)`` float32 in [0, 1] and ``labels (1797,)`` int64, in the file's order."""
    raw = resources.files("seqbook").joinpath("data", "digits.csv.gz").read_bytes()
    if hashlib.sha256(raw).hexdigest() != SHA256:
        raise RuntimeError("seqbook/data/digits.csv.gz is not the shipped file (sha256 differs): reinstall seqbook")
    rows = [line.split(",") for line in gzip.decompress(raw).decode("ascii").split()]
    values = torch.tensor([[int(v) for v in row] for row in rows], dtype=torch.int64)
    images = values[:, :-1].reshape(-1, SIDE, SIDE).float() / 16.0
    return images, values[:, -1].clone()


def train_test_split(n_test: int = 500, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The book's fixed split: a permutation drawn from ``seed``; its first ``n_test`` images are the test set.

    Returns ``(train_images, train_labels), (test_images, test_labels)``. The same arguments give the
    same split on every machine (a ``torch.Generator`` permutation).
    """
    images, labels = load_digits()
    if isinstance(n_test, bool) or not isinstance(n_test, int) or not 0 < n_test < len(labels):
        raise ValueError(f"n_test must be an int in (0, {len(labels)}), got {n_test!r}")
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def _hilbert(side: int) -> list[tuple[int, int]]:
    """The cells of a ``side x side`` grid (side a power of 2) along a Hilbert curve, as (row, col).

    The classic index-to-coordinate walk: at each scale, rotate/flip the quadrant so that
    consecutive cells are always neighbours."""
    cells = []
    for d in range(side * side):
        x = y = 0
        t, s = d, 1
        while s < side:
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:  # rotate the quadrant so that the curve enters and leaves at the right corners
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y = x + s * rx, y + s * ry
            t //= 4
            s *= 2
        cells.append((y, x))
    return cells


def pixel_order(name: str = "row", side: int = SIDE, seed: int = 0) -> torch.Tensor:
    """``order (side*side,)``: the row-major index of the pixel read at each step.

    ``"row"``: raster order, left to right, top to bottom (vertical neighbours are ``side`` steps
    apart); ``"snake"``: rows alternate direction (every step moves to a neighbour);
    ``"column"``: top to bottom, left to right; ``"hilbert"``: a Hilbert curve (neighbours in the
    sequence are neighbours in the image, and most neighbours in the image stay close in the
    sequence); ``"random"``: one fixed permutation from ``seed`` (all locality destroyed, as in
    permuted MNIST).
    """
    if name not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {name!r}")
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    if name == "row":
        return (r * side + c).reshape(-1)
    if name == "column":
        return (r * side + c).T.reshape(-1)
    if name == "snake":
        grid = r * side + c
        grid[1::2] = grid[1::2].flip(1)
        return grid.reshape(-1)
    if name == "hilbert":
        if side & (side - 1):
            raise ValueError(f"the Hilbert order needs a power-of-2 side, got {side}")
        return torch.tensor([i * side + j for i, j in _hilbert(side)])
    return torch.randperm(side * side, generator=torch.Generator().manual_seed(seed))


def as_sequences(images: torch.Tensor, order: str | torch.Tensor = "row", *, patch: int = 1,
                 positions: bool = False) -> torch.Tensor:
    """``images (n, side, side)`` -> ``x (n, L, patch**2 [+ L])``: the image cut into ``patch x patch`` squares,
    read in ``order`` over the ``(side/patch) x (side/patch)`` grid of patches (a name or a permutation).

    ``L = (side / patch)**2`` tokens, each the ``patch**2`` grey levels of its square (row-major
    inside it). ``positions=True`` appends the one-hot position of the token in the sequence
    (``L`` more features): a linear encoder's weights on those are then a learned position
    embedding, as in ViT and Vision Mamba. ``patch=1`` reads pixel by pixel (sequential MNIST's way).
    """
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be (n, side, side), got {tuple(images.shape)}")
    side = images.shape[1]
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or side % patch:
        raise ValueError(f"patch must be a positive int dividing the side {side}, got {patch!r}")
    grid = side // patch
    perm = pixel_order(order, grid) if isinstance(order, str) else order
    if not isinstance(perm, torch.Tensor) or sorted(perm.tolist()) != list(range(grid * grid)):
        raise ValueError(f"order must name one of {ORDERS} or be a permutation of range({grid * grid})")
    n = len(images)
    tokens = images.reshape(n, grid, patch, grid, patch).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, patch * patch)
    x = tokens[:, perm]
    if positions:
        x = torch.cat([x, torch.eye(grid * grid, dtype=x.dtype).expand(n, -1, -1)], dim=-1)
    return x
