"""DRSegUNet (thesis §4.3, tables 2-11): a pre-activated residual U-Net.

Stem → 4 encoders (stride-2 residual blocks) → bridge → 4 decoders (3x3 stride-2
transposed conv, skip concatenation, residual block) → 1x1 conv. ``forward`` returns
logits; softmax and decisions happen in inference.

Interpretation of the tables: the residual shortcuts are written "3x3" in the
tables, but the thesis's parameter count (5,484,276 with Keras counting BatchNorm
running statistics, 4 output classes) is reproduced exactly only with 1x1 shortcut
convolutions, as in ResUNet (Zhang et al. 2018); we use 1x1.

``build_network(config)`` builds the network a config names (``config.arch``):
DRSegUNet, or MONAI's U-Net as the comparison baseline (crossval.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import check_torch
from .config import Arch, NetworkConfig, Upsampling

check_torch(torch.__version__)  # one line (TorchVersionError) under a torch older than MIN_TORCH


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class Stem(nn.Module):
    """Table 2: conv-BN-ReLU-conv, plus a conv-BN shortcut from the input."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv3(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1)
        self.shortcut_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return y + self.shortcut_bn(self.shortcut(x))


class ResidualBlock(nn.Module):
    """Pre-activated residual block: (BN-ReLU-conv) x2 plus a conv-BN shortcut.

    The first conv carries the stride (encoders: 2; decoders: 1).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride)
        self.shortcut_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return y + self.shortcut_bn(self.shortcut(x))


class Encoder(ResidualBlock):
    """Tables 3-6: a residual block that halves the resolution (stride-2 convs)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, stride=2)


class Bridge(nn.Module):
    """Table 7: BN-ReLU-conv twice at the lowest resolution (no shortcut)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = _conv3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class Decoder(nn.Module):
    """Tables 8-11: up-sample x2, concatenate the encoder skip, residual block.

    ``upsampling="transpose"`` is the thesis's 3x3 stride-2 transposed conv;
    ``"upsample"`` is nearest up-sampling followed by a 3x3 conv (Table 13 ablation).
    """

    def __init__(self, cin: int, cskip: int, cout: int, upsampling: str = Upsampling.TRANSPOSE.value) -> None:
        super().__init__()
        if upsampling == Upsampling.TRANSPOSE:
            self.up = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        elif upsampling == Upsampling.UPSAMPLE:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv3(cin, cout))
        else:
            raise ValueError(f"unknown upsampling {upsampling!r}; use {' or '.join(map(repr, Upsampling.values()))}")
        self.block = ResidualBlock(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


def pad_to_multiple(x: torch.Tensor, channels: int, multiple: int, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Check an (N, channels, H, W) input and replicate-pad H, W up to ``multiple``;
    returns the padded input and the original (H, W) to crop the logits back to."""
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} expects input of shape (N, {channels}, H, W); got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class DRSegUNet(nn.Module):
    """The thesis's network; ``base_filters=16`` gives 5,484,276 Keras parameters.

    Input (N, in_channels, H, W) with any H, W: the input is padded to a multiple of
    2**depth and the logits are cropped back. Returns logits (N, num_classes, H, W).
    """

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or NetworkConfig()
        if config.arch != Arch.DRSEGUNET:
            raise ValueError(f"DRSegUNet built from a config for arch {config.arch!r}; use build_network")
        f = [config.base_filters * 2**i for i in range(config.depth + 1)]
        self.stem = Stem(config.in_channels, f[0])
        self.encoders = nn.ModuleList(Encoder(f[i], f[i + 1]) for i in range(config.depth))
        self.bridge = Bridge(f[-1])
        # Decoder 1 keeps the bridge's width (Table 8: 256), the others halve it:
        # outputs 256, 128, 64, 32 with skips 128, 64, 32, 16 for 16 start filters.
        dec_out = [f[-1]] + [f[i] for i in range(config.depth - 1, 0, -1)]
        dec_in = [f[-1]] + dec_out[:-1]
        skips = [f[i] for i in range(config.depth - 1, -1, -1)]
        self.decoders = nn.ModuleList(
            Decoder(dec_in[i], skips[i], dec_out[i], config.upsampling) for i in range(config.depth)
        )
        self.head = nn.Conv2d(dec_out[-1], config.num_classes, 1)

    @property
    def multiple(self) -> int:
        return 2**self.config.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.config.in_channels, self.multiple, "DRSegUNet")
        skips = [self.stem(x)]
        for enc in self.encoders:
            skips.append(enc(skips[-1]))
        y = self.bridge(skips.pop())
        for dec in self.decoders:
            y = dec(y, skips.pop())
        return self.head(y)[..., :h, :w]


ARCHS = Arch.values()


class MonaiUNet(nn.Module):
    """MONAI's residual U-Net (``monai.networks.nets.UNet``), the comparison baseline.

    Channels ``base_filters * 2**i`` for i = 0..depth, stride 2 at every level,
    ``res_units`` residual units per level, MONAI's defaults otherwise (instance norm,
    PReLU). Like DRSegUNet it takes any H, W (padded to a multiple of 2**depth,
    logits cropped back) and returns logits (N, num_classes, H, W).
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        try:
            from monai.networks.nets import UNet
        except ImportError:
            raise ImportError("arch 'monai_unet' needs the monai package (pip install monai==1.6.1, "
                              "see requirements-dev.txt); arch 'drsegunet' does not") from None
        self.config = config
        self.net = UNet(spatial_dims=2, in_channels=config.in_channels, out_channels=config.num_classes,
                        channels=tuple(config.base_filters * 2**i for i in range(config.depth + 1)),
                        strides=(2,) * config.depth, num_res_units=config.res_units)

    @property
    def multiple(self) -> int:
        return 2**self.config.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x, self.config.in_channels, self.multiple, "MonaiUNet")
        return self.net(x)[..., :h, :w]


def build_network(config: NetworkConfig | None = None) -> nn.Module:
    """The network ``config.arch`` names: DRSegUNet or MonaiUNet (monai imported only then)."""
    config = config or NetworkConfig()
    if config.arch == Arch.DRSEGUNET:
        return DRSegUNet(config)
    if config.arch == Arch.MONAI_UNET:
        return MonaiUNet(config)
    raise ValueError(f"unknown network arch {config.arch!r}; use one of {', '.join(ARCHS)}")


def parameter_count(model: nn.Module) -> int:
    """Parameters as torch counts them (BatchNorm running statistics not included)."""
    return sum(p.numel() for p in model.parameters())


def keras_parameter_count(model: nn.Module) -> int:
    """Parameters counted as Keras does: BatchNorm running mean/variance included."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n += m.running_mean.numel() + m.running_var.numel()
    return n
