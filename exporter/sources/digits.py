"""scikit-learn's bundled handwritten digits (no download) as model inputs: the data of the trained
samples in ``samples/02_digits``, of ``sweep capacity``'s accuracy and of ``inspect routing --sample``.

The 8x8 images (values 0..16, ink bright) are scaled to [0, 1], upsampled bilinearly to the model's
image size, repeated over its channels and normalised to [-1, 1]: ``(x - 0.5) / 0.5``, or to the model's
own ``normalization`` (``(x - mean) / std`` per channel: ImageNet's for Swin-MoE). Image files go
through the same steps from [0, 1] (``image_file``), so a picture of a digit must be a light digit on
a dark background to look like the training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exporter import settings
from exporter.errors import UserError

NUM_CLASSES = 10


@dataclass
class DigitsSplit:
    """Model-ready images ``[N, C, H, W]`` float32 and labels ``[N]`` int64 of both splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


REFERENCE_NORMALIZATION = settings.REFERENCE_NORMALIZATION  # (mean, std): [-1, 1], the reference's inputs


def _per_channel(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def to_model_input(
    images01: torch.Tensor, input_shape: tuple[int, ...], normalization=REFERENCE_NORMALIZATION
) -> torch.Tensor:
    """``[N, h, w]`` or ``[N, c, h, w]`` images in [0, 1] -> ``[N, *input_shape]`` normalised inputs
    (``normalization``: per-channel (mean, std))."""
    if images01.ndim == 3:
        images01 = images01.unsqueeze(1)
    chans, height, width = input_shape
    x = images01.float()
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if x.shape[1] != chans:
        x = x.mean(dim=1, keepdim=True).expand(-1, chans, -1, -1)  # grey to every channel
    if normalization == REFERENCE_NORMALIZATION:
        return ((x - 0.5) / 0.5).contiguous()
    mean, std = normalization
    return ((x - _per_channel(mean)) / _per_channel(std)).contiguous()


def to_display(inputs: torch.Tensor, normalization=REFERENCE_NORMALIZATION) -> np.ndarray:
    """Normalised model inputs ``[C, H, W]`` -> an ``[H, W, 3]`` picture in [0, 1]."""
    mean, std = normalization
    x = (inputs.detach().float() * _per_channel(std)[0] + _per_channel(mean)[0]).clamp(0, 1)
    if x.shape[0] != 3:
        x = x.mean(dim=0, keepdim=True).expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def load_split(
    input_shape: tuple[int, ...],
    *,
    test_size: int = settings.DIGITS_TEST_IMAGES,
    seed: int = settings.DIGITS_SPLIT_SEED,
    normalization=REFERENCE_NORMALIZATION,
) -> DigitsSplit:
    """The fixed, stratified train/test split of the 1797 digits, as inputs of ``input_shape`` (C, H, W)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_size, random_state=seed, stratify=digits.target
    )
    return DigitsSplit(
        to_model_input(torch.from_numpy(x_train), input_shape, normalization),
        torch.from_numpy(y_train).long(),
        to_model_input(torch.from_numpy(x_test), input_shape, normalization),
        torch.from_numpy(y_test).long(),
    )


def image_file(path: str | Path, input_shape: tuple[int, ...], normalization=REFERENCE_NORMALIZATION) -> torch.Tensor:
    """A PNG or JPEG file -> ``[1, *input_shape]`` normalised input (resized, grey if one channel)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:  # the size is in the header: checked before any pixel is decoded
            if im.width * im.height > settings.MAX_IMAGE_PIXELS:
                raise UserError(
                    f"image {path} is {im.width}x{im.height} pixels; the limit is {settings.MAX_IMAGE_PIXELS:,} "
                    "(settings.MAX_IMAGE_PIXELS): resize it first"
                )
            mode = "L" if input_shape[0] == 1 else "RGB"
            array = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as e:  # Pillow's own limit, far above ours
        raise UserError(f"image {path} is too large ({e}); the limit is {settings.MAX_IMAGE_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not a readable PNG or JPEG image ({type(e).__name__})") from None
    x = torch.from_numpy(array)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    return to_model_input(x.unsqueeze(0), input_shape, normalization)


@torch.no_grad()
def predict(module: torch.nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Logits of ``images`` in batches of ``batch`` images (a multiple of the routing group)."""
    return torch.cat([module(images[i : i + batch]) for i in range(0, len(images), batch)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())
