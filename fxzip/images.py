"""Calibration data from a path, for ``fxzip merge --data`` (and from Python).

Three kinds of ``PATH``:

* an image folder in torchvision's ``ImageFolder`` layout (``root/<class>/<img>``;
  a flat folder of images works too). Labels are ignored: calibration needs
  inputs only. Files are read in ImageFolder's order (directories sorted, files
  sorted within each), so a ``DataLoader`` over ``ImageFolder`` sees the same
  batches;
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` of such a folder (extracted to a temporary
  directory with tarfile's ``data`` filter: no absolute paths, links out of it
  or device files);
* a tensor file (``.pt`` or ``.npy``) of shape N x C x H x W. ``uint8`` tensors are
  images and get the image preprocessing; floating tensors are taken as model
  inputs that are already preprocessed (only converted to float32).

Image preprocessing is the model's evaluation transform from timm's data
config (``timm.data.resolve_data_config`` + ``create_transform``: resize,
center crop, normalisation); ``img_size`` overrides the config's input size
(e.g. a ViT built with ``img_size=64`` still declares 224 in its config).
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["DataSource", "check_data_path", "data_config", "image_transform", "open_data", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def check_data_path(path: str | os.PathLike) -> str:
    """The kind of ``path`` ("folder", "archive" or "tensor"), or a ValueError that
    says what is wrong and what fxzip accepts. Cheap: runs before any work."""
    p = Path(path)
    accepted = ("an image folder (ImageFolder layout), a .tar.gz of one, or a .pt/.npy tensor N x C x H x W")
    if not p.exists():
        raise ValueError(f"--data {p}: no such file or directory. Pass {accepted}.")
    if p.is_dir():
        if next(iter(_image_files(p)), None) is None:
            raise ValueError(f"--data {p}: no image files under it (looked for {', '.join(IMAGE_SUFFIXES)}). "
                             f"Pass {accepted}.")
        return "folder"
    name = p.name.lower()
    if name.endswith(ARCHIVE_SUFFIXES):
        if not tarfile.is_tarfile(p):
            raise ValueError(f"--data {p} is not a readable tar archive")
        return "archive"
    if name.endswith(TENSOR_SUFFIXES):
        return "tensor"
    raise ValueError(f"--data {p}: unknown kind of file. Pass {accepted}.")


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's evaluation data config of ``model``, ``img_size`` overriding its input size."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if img_size is not None:
        channels = resolve_data_config({}, model=model)["input_size"][0]
        args["input_size"] = (channels, img_size, img_size)
    return resolve_data_config(args, model=model)


def image_transform(config: dict[str, Any]) -> Callable:
    """The evaluation transform (resize, center crop, to tensor, normalise) of a data config."""
    from timm.data import create_transform

    return create_transform(**config, is_training=False)


class _ImageFiles(Dataset):
    def __init__(self, files: list[Path], transform: Callable, mode: str):
        self.files, self.transform, self.mode = files, transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert(self.mode))


class _Tensors(Dataset):
    def __init__(self, x: torch.Tensor, transform: Callable | None):
        self.x, self.transform = x, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.x[i]
        if self.transform is None:
            return x
        return self.transform(x.float() / 255.0)


class DataSource:
    """Batches of model inputs from ``path`` (see the module docstring), plus a
    one-line description of what was read. Holds the temporary directory of an
    extracted archive until ``close()`` (or the end of a ``with`` block)."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        self.path, self.config, self.batch_size = Path(path), config, batch_size
        self._tmp: tempfile.TemporaryDirectory | None = None
        kind = check_data_path(self.path)
        channels = config["input_size"][0]
        transform = image_transform(config)
        if kind == "tensor":
            x = _read_tensor(self.path)
            if x.shape[1] != channels:
                raise ValueError(f"--data {self.path}: the tensor has {x.shape[1]} channels (N x C x H x W = "
                                 f"{tuple(x.shape)}), the model takes {channels}")
            if x.dtype == torch.uint8:
                self.dataset: Dataset = _Tensors(x, transform)
                how = "uint8 images, preprocessed like image files"
            else:
                self.dataset = _Tensors(x.float(), None)
                how = f"{str(x.dtype).replace('torch.', '')} tensor taken as preprocessed model inputs"
            self.description = f"{len(x)} samples from {self.path.name} ({how})"
            return
        root = self.path
        if kind == "archive":
            self._tmp = tempfile.TemporaryDirectory(prefix="fxzip-data-")
            with tarfile.open(self.path) as tar:
                tar.extractall(self._tmp.name, filter="data")
            root = Path(self._tmp.name)
        files = list(_image_files(root))
        if not files:
            raise ValueError(f"--data {self.path}: the archive holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.dataset = _ImageFiles(files, transform, "L" if channels == 1 else "RGB")
        size = "x".join(map(str, config["input_size"][1:]))
        self.description = (f"{len(files)} images from {self.path.name} at {size} "
                            f"(resize + center crop {config.get('crop_pct')}, mean {tuple(config['mean'])}, "
                            f"std {tuple(config['std'])})")

    def spread(self, max_batches: int | None, processes: int = 1) -> str | None:
        """Keep ``max_batches`` batches per process of samples evenly spaced over
        the whole data instead of its first files: an image folder is read in
        ImageFolder's order, class by class, so its first batches would hold
        the first classes only, and the statistics of the others would be
        missing. Deterministic (every ``len / kept``-th sample). Returns what
        was done, for the user, or None when every sample is kept."""
        if max_batches is None:
            return None
        n, kept = len(self.dataset), max_batches * self.batch_size * processes
        if kept >= n:
            return None
        self.dataset = Subset(self.dataset, [i * n // kept for i in range(kept)])
        return (f"--max-batches {max_batches}: {kept} of the {n} samples, evenly spaced over the data "
                f"(one in every {n / kept:.2g}), so every part of it is seen")

    def loader(self) -> DataLoader:
        """A deterministic DataLoader (no shuffling; calibration order does not matter)."""
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "DataSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_data(path: str | os.PathLike, model: nn.Module, img_size: int | None = None,
              batch_size: int = 32) -> DataSource:
    """``DataSource`` of ``path`` preprocessed for ``model`` (timm data config)."""
    return DataSource(path, data_config(model, img_size), batch_size)


def _image_files(root: Path):
    """Image files under ``root`` in ImageFolder's order."""
    for dirpath, dirnames, filenames in sorted(os.walk(root, followlinks=True)):
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_SUFFIXES):
                yield Path(dirpath) / name


def _read_tensor(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        x = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        try:
            x = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"--data {path}: cannot read it with torch.load(weights_only=True): "
                             f"{type(exc).__name__}. Save the inputs as one tensor: torch.save(x, path)") from exc
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"--data {path} holds a {type(x).__name__}; expected one tensor N x C x H x W")
    if x.dim() != 4:
        raise ValueError(f"--data {path}: expected a tensor N x C x H x W, got shape {tuple(x.shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise ValueError(f"--data {path}: dtype {x.dtype}; expected uint8 images or floating model inputs")
    if len(x) == 0:
        raise ValueError(f"--data {path} holds no samples (shape {tuple(x.shape)})")
    return x
