import pytest
import torch

from cxr_fastai.model import ResNet9


@pytest.mark.parametrize("size", [16, 32, 48, 64, 100])
def test_output_shape_and_gradients_for_any_input_size(size):
    torch.manual_seed(0)
    m = ResNet9(n_in=1, n_out=3, widths=(8, 16, 32, 64))
    x = torch.randn(4, 1, size, size, requires_grad=True)
    y = m(x)
    assert y.shape == (4, 3)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.head.weight.grad.abs().sum() > 0


def test_non_square_input_and_feature_map_shape():
    m = ResNet9(n_in=1, n_out=2, widths=(8, 16, 32, 64)).eval()
    x = torch.randn(2, 1, 64, 40)
    assert m.forward_features(x).shape == (2, 64, 8, 5)
    assert m(x).shape == (2, 2)


def test_embed_is_what_the_head_reads():
    # Grad-CAM and benchmarks/last_layer.py split the model here: head(embed(x)) must be the model itself
    torch.manual_seed(0)
    m = ResNet9(n_in=1, n_out=3, widths=(8, 16, 32, 64)).eval()
    x = torch.randn(3, 1, 40, 40)
    e = m.embed(x)
    assert e.shape == (3, 64)
    assert torch.equal(e, m.forward_features(x).amax((2, 3)))
    assert torch.equal(m.head(e), m(x))


def test_widths_classes_and_channels_are_arguments():
    m = ResNet9(n_in=3, n_out=5, widths=(4, 8, 12, 16))
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert m.head.in_features == 16
    default = ResNet9()
    assert default.prep[0].in_channels == 1 and default.head.out_features == 3
    assert default.head.in_features == 512


@pytest.mark.parametrize("kw", [dict(n_out=1), dict(widths=(8, 16, 32)), dict(n_in=0)])
def test_bad_arguments_are_refused(kw):
    with pytest.raises(ValueError):
        ResNet9(**kw)
