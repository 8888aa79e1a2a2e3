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
(e.g. a ViT built with ``img_size=64`` still declares 224 in its config), and
``crop_pct`` / ``crop_mode`` / ``interpolation`` its crop, as timm names them.

Images are decoded when a batch is read. A file that cannot be decoded (a
truncated JPEG, a text file named ``x.jpg``) is left out of its batch with a
warning naming it (``DataSource.skipped`` lists them; ``fxzip merge`` puts the
count in its report); a batch whose every file failed is skipped. With
``strict=True`` (``--strict-data``) the first such file is an error instead.
Decoding is strict either way: PIL's ``LOAD_TRUNCATED_IMAGES`` stays off, so a
truncated file is never read as a half-grey image.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

__all__ = ["DataSource", "check_data_path", "check_crop_options", "data_config", "image_transform", "open_data",
           "IMAGE_SUFFIXES", "CROP_MODES", "INTERPOLATIONS"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CROP_MODES = ("center", "squash", "border")
"""timm's evaluation crop modes (``timm.data.transforms_imagenet_eval``)."""
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
"""timm's interpolation names for resizing (``timm.data.transforms.str_to_interp_mode``)."""
WARNED_FILES = 5
"""Files that cannot be decoded are warned about one by one up to this many; then once for the rest."""
_ARCHIVE_ERRORS = (EOFError, tarfile.ReadError, tarfile.CompressionError, zlib.error, OSError)


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
        try:  # the first header only: a truncation further on is found when the archive is extracted
            with tarfile.open(p) as tar:
                tar.next()
        except _ARCHIVE_ERRORS as exc:
            raise ValueError(_archive_error(p, exc)) from None
        return "archive"
    if name.endswith(TENSOR_SUFFIXES):
        return "tensor"
    raise ValueError(f"--data {p}: unknown kind of file. Pass {accepted}.")


def check_crop_options(crop_pct: float | None = None, crop_mode: str | None = None,
                       interpolation: str | None = None) -> None:
    """A ValueError naming the accepted values for a crop option timm would not
    take (None: the model's data config). Cheap: runs before any work."""
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"--crop-pct must be in (0, 1] (the fraction of the resized image kept by the crop; "
                         f"1 keeps it all), got {crop_pct}")
    if crop_mode is not None and crop_mode not in CROP_MODES:
        raise ValueError(f"--crop-mode {crop_mode!r} is not one of timm's crop modes: {', '.join(CROP_MODES)}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation {interpolation!r} is not one of timm's interpolations: "
                         f"{', '.join(INTERPOLATIONS)}")


def data_config(model: nn.Module, img_size: int | None = None, crop_pct: float | None = None,
                crop_mode: str | None = None, interpolation: str | None = None) -> dict[str, Any]:
    """timm's evaluation data config of ``model``, ``img_size`` overriding its input
    size and ``crop_pct`` / ``crop_mode`` / ``interpolation`` its crop (None: the
    model's own)."""
    from timm.data import resolve_data_config

    check_crop_options(crop_pct, crop_mode, interpolation)
    args: dict[str, Any] = {"crop_pct": crop_pct, "crop_mode": crop_mode, "interpolation": interpolation}
    if img_size is not None:
        channels = resolve_data_config({}, model=model)["input_size"][0]
        args["input_size"] = (channels, img_size, img_size)
    return resolve_data_config(args, model=model)


def image_transform(config: dict[str, Any]) -> Callable:
    """The evaluation transform (resize, center crop, to tensor, normalise) of a data config."""
    from timm.data import create_transform

    return create_transform(**config, is_training=False)


class _Unreadable:
    """What ``_ImageFiles`` returns for a file it cannot decode: the collate
    function leaves it out of the batch and the loader records it."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason


class _ImageFiles(Dataset):
    def __init__(self, files: list[Path], transform: Callable, mode: str, strict: bool = False,
                 names: list[str] | None = None):
        self.files, self.transform, self.mode, self.strict = files, transform, mode, strict
        self.names = names if names is not None else [str(f) for f in files]  # as the user knows them

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        try:  # Image.open only reads the header; convert() decodes, and fails on a truncated file
            with Image.open(self.files[i]) as img:
                img = img.convert(self.mode)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... per format
            detail = str(exc).splitlines()[0].replace(str(self.files[i]), self.names[i]) if str(exc) else "no detail"
            reason = f"{type(exc).__name__}: {detail}"
            if self.strict:
                raise ValueError(f"--data: {self.names[i]} cannot be decoded as an image ({reason}); remove or "
                                 "replace the file, or leave out --strict-data to skip such files with a "
                                 "warning") from None
            return _Unreadable(self.names[i], reason)
        return self.transform(img)


def _collate_readable(samples: list[Any]) -> tuple[torch.Tensor | None, list[_Unreadable]]:
    """A batch of the samples that could be read (None when none could) and the failures."""
    failed = [s for s in samples if isinstance(s, _Unreadable)]
    readable = [s for s in samples if not isinstance(s, _Unreadable)]
    return (default_collate(readable) if readable else None), failed


class ImageBatches:
    """The batches of a ``DataSource``, re-iterable: a ``DataLoader`` whose
    batches leave out the files that cannot be decoded (recorded on the source,
    with a warning the first time each is seen); a batch with no readable file
    is skipped. Deterministic: the same batches, in order, on every pass."""

    def __init__(self, source: "DataSource", batch_size: int | None, batch_sampler: Any = None):
        self.source, self.dataset = source, source.dataset
        self.batch_size = batch_size
        if batch_sampler is None:
            self.loader = DataLoader(source.dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                     collate_fn=_collate_readable)
        else:
            self.loader = DataLoader(source.dataset, batch_sampler=batch_sampler, num_workers=0,
                                     collate_fn=_collate_readable)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = 0
        for batch, failed in self.loader:
            for f in failed:
                self.source._skip(f)
            if batch is not None:
                batches += 1
                yield batch
        if batches == 0 and len(self.loader) > 0:
            name, why = next(iter(self.source.skipped.items()), ("?", "?"))
            raise ValueError(f"--data {self.source.path}: none of its images could be decoded "
                             f"({len(self.source.skipped)} files, e.g. {name}: {why}); check the files")


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

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], batch_size: int = 32, strict: bool = False):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        self.path, self.config, self.batch_size, self.strict = Path(path), config, batch_size, strict
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.skipped: dict[str, str] = {}
        """Files that could not be decoded (as the user names them) and why, in the order found."""
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
            try:
                with tarfile.open(self.path) as tar:
                    tar.extractall(self._tmp.name, filter="data")
            except tarfile.FilterError as exc:
                self.close()
                raise ValueError(f"--data {self.path}: the archive holds a member fxzip does not extract ({exc}): "
                                 "only plain files and folders inside it are read; re-create it from an image "
                                 "folder (tar czf calib.tar.gz calib/)") from None
            except _ARCHIVE_ERRORS as exc:
                self.close()
                raise ValueError(_archive_error(self.path, exc)) from None
            root = Path(self._tmp.name)
        files = list(_image_files(root))
        if not files:
            self.close()
            raise ValueError(f"--data {self.path}: the archive holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        names = ([f"{self.path}:{f.relative_to(root).as_posix()}" for f in files] if kind == "archive"
                 else [str(f) for f in files])
        self.dataset = _ImageFiles(files, transform, "L" if channels == 1 else "RGB", strict, names)
        size = "x".join(map(str, config["input_size"][1:]))
        self.description = (f"{len(files)} images from {self.path.name} at {size} "
                            f"(resize + {config.get('crop_mode') or 'center'} crop {config.get('crop_pct')}, "
                            f"{config.get('interpolation')}, mean {tuple(config['mean'])}, "
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

    def loader(self, batch_sampler: Any = None) -> ImageBatches:
        """The batches, deterministic (no shuffling; calibration order does not
        matter), without the files that cannot be decoded (see ``skipped``).
        ``batch_sampler``: which samples form each batch (e.g. this rank's shard,
        ``fxzip.distributed.shard_batches``) instead of ``batch_size`` in order."""
        return ImageBatches(self, None if batch_sampler is not None else self.batch_size, batch_sampler)

    def _skip(self, failed: _Unreadable) -> None:
        name = failed.name
        if name in self.skipped:
            return
        self.skipped[name] = failed.reason
        n = len(self.skipped)
        if n <= WARNED_FILES:
            warnings.warn(f"--data: {name} cannot be decoded as an image ({failed.reason}); it is skipped "
                          "(--strict-data, or DataSource(strict=True), fails instead)", stacklevel=2)
        elif n == WARNED_FILES + 1:
            warnings.warn(f"--data: {name} cannot be decoded as an image either ({failed.reason}); more than "
                          f"{WARNED_FILES} files are skipped, the rest without a warning each (the count is in "
                          "the merge report)", stacklevel=2)

    def skipped_summary(self, first: int = 5) -> dict[str, Any]:
        """For a report: how many files were skipped and the first few, with why."""
        return {"skipped_files": len(self.skipped),
                "skipped_examples": [f"{name} ({why})" for name, why in list(self.skipped.items())[:first]]}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "DataSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_data(path: str | os.PathLike, model: nn.Module, img_size: int | None = None,
              batch_size: int = 32, *, crop_pct: float | None = None, crop_mode: str | None = None,
              interpolation: str | None = None, strict: bool = False) -> DataSource:
    """``DataSource`` of ``path`` preprocessed for ``model`` (timm data config,
    with ``img_size`` and the crop options overriding it; see ``data_config``).
    ``strict``: a file that cannot be decoded is an error instead of skipped."""
    config = data_config(model, img_size, crop_pct, crop_mode, interpolation)
    return DataSource(path, config, batch_size, strict)


def _archive_error(path: Path, exc: BaseException) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else "no detail"
    return (f"--data {path}: the archive is truncated or corrupt ({type(exc).__name__}: {detail}); re-create it "
            "(e.g. tar czf calib.tar.gz calib/) or pass the image folder itself")


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
