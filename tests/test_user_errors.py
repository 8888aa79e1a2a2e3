"""Errors a new user met (issue 13, item 6): each names the real problem and the
fix, before any calibration."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxzip
from fxzip.zoo import small_cnn

timm = pytest.importorskip("timm")


def cnns():
    torch.manual_seed(0)
    return small_cnn(out_dim=4, in_channels=3, width=8).eval(), small_cnn(out_dim=4, in_channels=3, width=8).eval()


def test_a_dataset_is_not_batches():
    a, b = cnns()
    dataset = TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8))
    with pytest.raises(TypeError, match=r"data is a Dataset \(TensorDataset\).*wrap it in a DataLoader"):
        fxzip.merge(a, b, data=dataset, progress=False)
    merged = fxzip.merge(a, b, data=DataLoader(dataset, batch_size=4), progress=False)  # the fix works
    assert merged.meta["fxzip"].calib_batches == 2


@pytest.mark.parametrize("make, message", [
    (lambda x: x.double(), r"data is torch.float64 but the model's parameters are torch.float32: convert"),
    (lambda x: (x * 40 + 128).clamp(0, 255).to(torch.uint8), r"uint8 \(raw pixels\).*x.float\(\) / 255"),
])
def test_data_of_another_dtype_says_dtype(make, message):
    a, b = cnns()
    with pytest.raises(TypeError, match=message):
        fxzip.merge(a, b, data=[make(torch.randn(4, 3, 8, 8))], progress=False)


def test_a_half_precision_model_with_float_data_says_dtype():
    a, b = cnns()
    with pytest.raises(TypeError, match=r"data is torch.float32 but the model's parameters are torch.float16"):
        fxzip.merge(a.half(), b.half(), data=[torch.randn(4, 3, 8, 8)], progress=False)


def test_a_vit_built_for_224_fed_64_px_says_img_size():
    vit = timm.create_model("deit_tiny_patch16_224", num_classes=3, depth=1)
    with pytest.raises(ValueError, match=r"built for 224x224 images but the data is 64x64.*img_size=64"):
        fxzip.merge(vit, vit, data=[torch.randn(2, 3, 64, 64)], progress=False)


def test_data_free_apis_take_the_size_a_vit_was_built_for():
    vit = timm.create_model("deit_tiny_patch16_224", num_classes=3, depth=1, img_size=32).eval()
    permuted = fxzip.permute_channels(vit)  # used to pick 224 from the pretrained config and fail
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(x), permuted(x), atol=1e-4, rtol=1e-4)


def test_a_compiled_model_says_pass_the_original():
    a, b = cnns()
    compiled = torch.compile(a)  # compiles lazily: building it costs nothing
    with pytest.raises(TypeError, match=r"torch.compile wrapper.*model._orig_mod"):
        fxzip.merge(compiled, b, data=[torch.randn(4, 3, 8, 8)], progress=False)
    with pytest.raises(TypeError, match=r"model._orig_mod"):
        fxzip.permute_channels(compiled, example_inputs=torch.randn(2, 3, 8, 8))


def test_a_state_dict_says_load_it_into_a_model_first():
    a, b = cnns()
    with pytest.raises(TypeError, match=r"model 1 is a OrderedDict \(a state_dict\?\).*load_state_dict"):
        fxzip.merge(a, b.state_dict(), data=[torch.randn(4, 3, 8, 8)], progress=False)


def test_no_torch_fx_traceback_on_stderr_before_the_error(capsys):
    a, _ = cnns()
    traced = fxzip.trace(a, torch.randn(2, 3, 8, 8))  # a GraphModule: its graph runs under ShapeProp
    with pytest.raises(ValueError, match=r"expected input\[2, 2, 8, 8\] to have 3 channels"):
        fxzip.merge(traced, traced, data=[torch.randn(4, 2, 8, 8)], progress=False)
    assert capsys.readouterr().err == ""
