"""fastai types the DataBlock uses. Module-level so that exported pickles load in any process."""
from __future__ import annotations

import numpy as np
from fastai.data.transforms import Transform
from fastai.torch_core import TensorImageBW
from fastai.vision.core import PILImageBW

from ..io.images import apply_contrast, crop_border, read_grey


class CxrTensorImage(TensorImageBW):
    """A batch of radiographs. fastai draws grey tensors with matplotlib's 'Greys' map, which shows bright
    as black; `show_batch` should show a film as it is read."""
    _show_args = {"cmap": "gray"}


class CxrImage(PILImageBW):
    """A grey radiograph read by `images.read_grey` (16-bit scaled, alpha on black, EXIF applied)."""
    _show_args, _tensor_cls = {"cmap": "gray"}, CxrTensorImage

    @classmethod
    def create(cls, fn, **kwargs):
        if isinstance(fn, (str,)) or hasattr(fn, "__fspath__"):
            return super().create(read_grey(fn))
        return super().create(fn, **kwargs)


class Contrast(Transform):
    """The run's per-image contrast normalisation (io.images.apply_contrast) as a fastai item transform, so
    that the exported pickle's test_dl applies it too. Before any resize (order 0)."""
    order = 0

    def __init__(self, kind: str = "none"):
        super().__init__()
        self.kind = kind

    def encodes(self, x: PILImageBW):
        return type(x).create(apply_contrast(np.asarray(x), self.kind))


class CropBorder(Transform):
    """The run's border crop (io.images.crop_border) as a fastai item transform, before the contrast step and
    any resize, so that the exported pickle's test_dl applies it too."""
    order = 0

    def __init__(self, frac: float = 0.0):
        super().__init__()
        self.frac = frac

    def encodes(self, x: PILImageBW):
        return type(x).create(crop_border(np.asarray(x), self.frac))
