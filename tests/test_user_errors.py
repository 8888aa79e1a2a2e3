"""Errors a new user met (issue 13, item 6): each names the real problem and the
fix, before any calibration."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
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


# -- two models that really differ in structure: the first real difference, in the user's terms

def test_timm_and_torchvision_resnet18_are_one_architecture_to_the_check():
    """Same structure, other names (act1 vs relu, same op and shape): not a difference."""
    import torchvision

    from fxzip.options import check_same_architecture

    x = torch.randn(2, 3, 32, 32)
    ours = fxzip.trace(timm.create_model("resnet18", num_classes=10, pretrained=False).eval(), x)
    theirs = fxzip.trace(torchvision.models.resnet18(num_classes=10).eval(), x)
    check_same_architecture([ours, theirs])  # used to fail at 'act1' vs 'relu'
    deeper = fxzip.trace(timm.create_model("resnet34", num_classes=10, pretrained=False).eval(), x)
    with pytest.raises(ValueError, match=r"differ after 'layer1.1.relu': first differing node 'layer2_0_conv1' "
                       r"\(layer2.0.conv1: Conv2d 64->128, kernel_size 3, stride 2\) vs model 1's 'layer1_2_conv1' "
                       r"\(layer1.2.conv1: Conv2d 64->64, kernel_size 3\): out_channels 128 vs 64; stride 2 vs 1;"
                       r".*output shape \(2, 128, 4, 4\) vs \(2, 64, 8, 8\)"):
        check_same_architecture([theirs, deeper])


class _Stem(nn.Module):
    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=padding)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_configuration_difference_names_the_attribute_and_the_shapes():
    """Conv2d 3->8, kernel 3 in both: the summary alone would read the same; the
    message says padding and the output shapes."""
    with pytest.raises(ValueError, match=r"differ at the input: first differing node 'conv' \(conv: Conv2d 3->8, "
                       r"kernel_size 3\) vs model 1's 'conv' \(conv: Conv2d 3->8, kernel_size 3\): padding 1 vs 2; "
                       r"output shape \(2, 8, 8, 8\) vs \(2, 8, 10, 10\)\. .*nothing to merge"):
        fxzip.merge(_Stem(1), _Stem(2), data=[torch.randn(4, 3, 8, 8)], progress=False)


class _Skip(nn.Module):
    """The residual add reads the conv's output or the activation's: same ops, same shapes."""

    def __init__(self, after_act: bool) -> None:
        super().__init__()
        self.after_act = after_act
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv1(x)
        a = self.act(h)
        y = self.conv2(a) + (a if self.after_act else h)
        return self.fc(y.mean((2, 3)))


def test_a_data_flow_difference_says_what_each_reads():
    from fxzip.options import check_same_architecture

    x = torch.randn(2, 3, 8, 8)
    gms = [fxzip.trace(_Skip(False), x), fxzip.trace(_Skip(True), x)]
    with pytest.raises(ValueError, match=r"first differing node 'add' \(function add -> shape \(2, 8, 8, 8\)\) vs "
                       r"model 1's 'add' \(function add -> shape \(2, 8, 8, 8\)\): it reads other tensors: model 0's "
                       r"reads 'conv2', 'conv1' \(in model 1: 'conv2', 'conv1'\), model 1's reads 'conv2', 'act'"):
        check_same_architecture(gms)
    # merge no longer takes them for one graph (same ops and shapes node for node): a partial zip before the add
    report = fxzip.merge(_Skip(False), _Skip(True), data=[x], progress=False).meta["fxzip"]
    assert report.cut.name == "conv1" and "it reads other tensors" in report.cut_reason


# -- no internal repr or jargon in a message

_INTERNAL = re.compile(r"Layout\(|Segment\(|ParamView\(|Proxy\(|no-channel op|call_function|call_module|call_method|"
                       r"head ax[ie]s|head layout|group_dim|stack_dim|\(M\)|\(U\)")


class _Conv(nn.Module):
    """A conv, then ``op`` on its output (a CNN: no attention anywhere)."""

    def __init__(self, op) -> None:
        super().__init__()
        self.conv, self.fc, self.op = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4), op

    def forward(self, x):
        return self.fc(self.op(self.conv(x)))


def _shuffled(h):
    return h.view(h.shape[0], 2, 4, h.shape[2], h.shape[3])  # a channel shuffle's (groups, channels per group)


@pytest.mark.parametrize("op, expected", [
    (lambda h: torch.cumsum(h, 1).mean((2, 3)),
     r"no channel rule for function torch.cumsum at node 'cumsum'.*@fxzip.register_rule\(torch.cumsum\)"),
    (lambda h: h.reshape(h.shape[0], 4, -1).mean(2).repeat(1, 2),
     r"reshapes the channel axis 1 of \(2, 8, 4, 4\) into \(4, 32\); fxzip follows a reshape of the channel axis "
     r"when it keeps channels whole"),
    (lambda h: h[:, [0, 2, 4, 6, 1, 3, 5, 7]].mean((2, 3)), r"indexes the channel axis with \[0, 2, 4, 6"),
    (lambda h: F.pad(_shuffled(h), (1, 1)).reshape(h.shape[0], 8, 4, 6).mean((2, 3)),
     r"reads 'view', whose channels are split over several axes \(8 channels split into groups .* along axis 1, "
     r"the channels of each group along axis 2\)"),
    (lambda h: torch.cat([_shuffled(h)] * 2, 1).reshape(h.shape[0], 16, 4, 4)[:, :8].mean((2, 3)),
     r"concatenates tensors whose channels are split into groups"),
    (lambda h: (_shuffled(h) + h.view(h.shape[0], 4, 2, 4, 4).transpose(1, 2)).reshape(h.shape[0], 8, 4, 4)
     .mean((2, 3)), r"whose channel groups sit on different axes"),
], ids=["unknown_op", "reshape", "index", "grouped_into_plain_rule", "cat_of_groups", "groups_on_other_axes"])
def test_messages_name_ops_and_shapes_not_internals(op, expected):
    model = _Conv(op)
    with pytest.raises(fxzip.AnalysisError) as info:
        fxzip.analyze(fxzip.trace(model, torch.randn(2, 3, 4, 4)))
    message = str(info.value)
    assert re.search(expected, message), message
    assert not _INTERNAL.search(message), message


def test_a_message_about_concatenated_channels_speaks_of_channels():
    """Two concatenated 4-channel maps, flattened with their pixels, added to 32
    features of a Linear: the channels do not line up, said in channels and
    elements, not in internal segments."""
    class Joined(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.lin, self.fc = nn.Linear(12, 32), nn.Linear(32, 4)

        def forward(self, x):
            cat = torch.cat([self.a(x), self.b(x)], 1).flatten(1)  # 8 channels x 4 pixels
            return self.fc(cat + self.lin(x.flatten(1)))

    with pytest.raises(fxzip.AnalysisError) as info:
        fxzip.analyze(fxzip.trace(Joined(), torch.randn(2, 3, 2, 2)))
    message = str(info.value)
    assert "combines channel axes with different structure: 4 + 4 channels (concatenated) of 4 elements each " \
           "(a flattened C x H x W map) vs 32 channels" in message, message
    assert not _INTERNAL.search(message), message
