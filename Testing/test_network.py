import pytest
import torch

from DRSegUNetLib.config import NetworkConfig
from DRSegUNetLib.network import DRSegUNet, keras_parameter_count

THESIS_PARAMETERS = 5_484_276


def test_parameter_count_matches_thesis_keras_count():
    n = keras_parameter_count(DRSegUNet())
    assert abs(n - THESIS_PARAMETERS) / THESIS_PARAMETERS < 0.005
    # BatchNorm running statistics are what separates Keras' count from torch's.
    assert n > sum(p.numel() for p in DRSegUNet().parameters())


def test_block_widths_follow_tables():
    m = DRSegUNet()
    assert [e.conv1.out_channels for e in m.encoders] == [32, 64, 128, 256]
    assert [e.conv1.stride for e in m.encoders] == [(2, 2)] * 4
    assert [(d.up.in_channels, d.up.out_channels) for d in m.decoders] == [(256, 256), (256, 128), (128, 64), (64, 32)]
    assert [d.block.conv1.in_channels for d in m.decoders] == [384, 192, 96, 48]
    assert m.decoders[0].up.kernel_size == (3, 3) and m.decoders[0].up.stride == (2, 2)
    assert m.head.out_channels == 4


@pytest.mark.parametrize("h,w", [(16, 16), (37, 50), (65, 31), (1, 1), (100, 17)])
def test_any_size_gives_same_size_logits(h, w):
    m = DRSegUNet(NetworkConfig(base_filters=4)).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 1, h, w))
    assert y.shape == (2, 4, h, w)


def test_upsampling_variant_and_unknown_variant():
    m = DRSegUNet(NetworkConfig(base_filters=4, upsampling="upsample"))
    assert m(torch.randn(1, 1, 24, 40)).shape == (1, 4, 24, 40)
    with pytest.raises(ValueError, match="upsampling"):
        DRSegUNet(NetworkConfig(upsampling="bilinear-magic"))


def test_forward_backward_reaches_every_parameter():
    m = DRSegUNet(NetworkConfig(base_filters=4))
    loss = m(torch.randn(2, 1, 32, 48)).logsumexp(1).mean()
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_wrong_input_shape_says_what_to_pass():
    m = DRSegUNet(NetworkConfig(base_filters=4))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        m(torch.randn(32, 32))
