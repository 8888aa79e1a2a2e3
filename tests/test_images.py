"""--data: an image folder, a .tar.gz of one, or a tensor file, preprocessed with
the model's timm data config; bad paths are refused naming what is accepted."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from fxzip.cli.images import check_data_path, data_config, open_data
from fxzip.model_spec import ModelSpec, build_model

timm = pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / "data" / f"c{i % 2}" / f"{i}.png")
    with tarfile.open(root / "data.tar.gz", "w:gz") as tar:
        tar.add(root / "data", arcname="data")
    return root


def test_folder_and_archive_give_the_imagefolder_batches(folder):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    model = timm.create_model("resnet18")
    config = data_config(model, 16)
    assert config["input_size"] == (3, 16, 16)
    reference = ImageFolder(str(folder / "data"), transform=create_transform(**config, is_training=False))
    want = torch.stack([x for x, _ in reference])
    got = torch.cat(list(open_data(folder / "data", model, 16, batch_size=4).loader()))
    assert torch.equal(want, got)
    with open_data(folder / "data.tar.gz", model, 16, batch_size=4) as source:
        assert torch.equal(want, torch.cat(list(source.loader())))
        assert "6 images" in source.description


def test_max_batches_spreads_over_the_whole_folder(folder):
    """A capped calibration takes samples from every class folder, not the
    first files in ImageFolder's (class by class) order."""
    from torchvision.datasets import ImageFolder

    model = timm.create_model("resnet18")
    labels = [y for _, y in ImageFolder(str(folder / "data"))]  # c0, c0, c0, c1, c1, c1
    source = open_data(folder / "data", model, 16, batch_size=1)
    assert source.spread(None) is None and source.spread(6) is None and len(source.dataset) == 6
    assert "2 of the 6 samples" in source.spread(2)
    assert sorted(labels[i] for i in source.dataset.indices) == [0, 1]
    assert len(list(source.loader())) == 2


def test_tensor_files(folder):
    model = timm.create_model("resnet18")
    images = np.random.default_rng(1).integers(0, 256, (5, 3, 20, 20), dtype=np.uint8)
    np.save(folder / "u8.npy", images)
    batch = next(iter(open_data(folder / "u8.npy", model, 16, batch_size=5).loader()))
    assert batch.shape == (5, 3, 16, 16) and batch.dtype == torch.float32  # resized and normalised
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    torch.save(x, folder / "f64.pt")
    batch = next(iter(open_data(folder / "f64.pt", model, None, batch_size=4).loader()))
    assert torch.equal(batch, x.float())  # floating tensors are model inputs, used as they are


def test_vit_data_config_follows_img_size():
    model = build_model(ModelSpec("vit_tiny_patch16_224", 3, 32))
    assert model.patch_embed.img_size == (32, 32) and data_config(model, 32)["input_size"] == (3, 32, 32)
    spec = ModelSpec("resnet18", 3, 32)
    build_model(spec)
    assert spec.img_size is None  # resnet takes no img_size: the spec rebuilds it as built


def test_bad_data_is_refused_with_what_is_accepted(folder):
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files under it"):
        check_data_path(folder / "empty")
    (folder / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown kind of file.*ImageFolder layout"):
        check_data_path(folder / "notes.txt")
    model = timm.create_model("resnet18")
    torch.save(torch.randn(4, 16, 16), folder / "three_dims.pt")
    with pytest.raises(ValueError, match="N x C x H x W, got shape"):
        open_data(folder / "three_dims.pt", model)
    torch.save(torch.randn(4, 1, 16, 16), folder / "gray.pt")
    with pytest.raises(ValueError, match="1 channels .* the model takes 3"):
        open_data(folder / "gray.pt", model)
    torch.save({"x": torch.randn(2, 3, 8, 8)}, folder / "dict.pt")
    with pytest.raises(ValueError, match="holds a dict; expected one tensor"):
        open_data(folder / "dict.pt", model)
