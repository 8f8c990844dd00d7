"""fastai types the DataBlock uses. Module-level so that exported pickles load in any process."""
from __future__ import annotations

from fastai.vision.core import PILImageBW

from ..io.images import read_grey


class CxrImage(PILImageBW):
    """A grey radiograph read by `images.read_grey` (16-bit scaled, alpha on black, EXIF applied)."""

    @classmethod
    def create(cls, fn, **kwargs):
        if isinstance(fn, (str,)) or hasattr(fn, "__fspath__"):
            return super().create(read_grey(fn))
        return super().create(fn, **kwargs)
