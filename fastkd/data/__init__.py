"""Data pipelines: DALI (GPU, or the same graph on the CPU) and a torchvision fallback.

Entry points:

* :class:`DataConfig`: every setting of both backends (documented field by field).
* :func:`build_loader` ``(cfg, split, rank, world_size)``: an iterable of dict batches
  (``images``, ``labels``, optional soft ``targets``, ``index``, ``is_pad``) with ``len``,
  ``set_epoch``, ``state_dict``/``load_state_dict``, ``num_classes``, ``backend``, ``corrupt`` and
  ``corrupt_summary()`` (the split's corrupt-file totals for a run summary).
* :func:`prepare_digits`, :func:`prepare_photos`: small real data sets shipped inside
  scikit-learn / scikit-image, written as ImageFolder JPEGs (``fastkd data prepare``).
"""

from fastkd.data.config import DataConfig
from fastkd.data.loader import BaseLoader
from fastkd.data.loader import CorruptImageError
from fastkd.data.loader import build_loader
from fastkd.data.loader import dali_available
from fastkd.data.prepare import make_jpeg_folder
from fastkd.data.prepare import prepare_digits
from fastkd.data.prepare import prepare_photos
from fastkd.data.prepare import write_filelists
from fastkd.data.prepare import write_webdataset

__all__ = [
    "BaseLoader",
    "CorruptImageError",
    "DataConfig",
    "build_loader",
    "dali_available",
    "make_jpeg_folder",
    "prepare_digits",
    "prepare_photos",
    "write_filelists",
    "write_webdataset",
]
