"""The data configuration: one plain dataclass, :class:`DataConfig`, shared by both backends."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKENDS = ("auto", "dali", "torch")
SOURCES = ("auto", "folder", "filelist", "webdataset")
DTYPES = ("float32", "float16", "bfloat16")
SHARD_POLICIES = ("pad", "drop")
CORRUPT_POLICIES = ("skip", "replace", "error")
INTERPOLATIONS = ("bilinear", "bicubic")
MIXUP_MODES = ("batch", "pair", "elem")
ERASING_MODES = ("pixel", "rand", "const")
SPLITS = ("train", "val")


@dataclass
class DataConfig:
    """Everything :func:`fastkd.data.build_loader` needs. Both backends read the same fields.

    Where the data lives
        root: Data set directory. With ``source="folder"`` it holds ``train/`` and ``val/`` ImageFolder
            trees (``<split>/<class>/<image>``, class index = position of the folder name in sorted order,
            taken from the train split); with ``"filelist"`` the files ``train.txt`` / ``val.txt``; with
            ``"webdataset"`` the folders ``train/`` / ``val/`` of ``*.tar`` shards (or ``train-*.tar`` /
            ``val-*.tar`` beside each other).
        train_path, val_path: Explicit location of one split (a folder, a list file, a tar file, a folder
            of tars, or a glob of tars); overrides what ``root`` implies. Relative paths in a file list are
            resolved against the list file's folder.
        source: ``"folder" | "filelist" | "webdataset" | "auto"``. ``auto`` picks from the path: a ``.txt``
            file is a file list, a ``.tar`` file, glob or folder of tars is webdataset, any other folder is
            an ImageFolder tree. Webdataset samples are the members ``<key>.jpg|jpeg|png`` plus
            ``<key>.cls`` (the class index as text).
        num_classes: Number of classes; 0 infers it (folder: number of class folders; list/tars: largest
            label + 1). Sets the width of the soft targets.

    How it is loaded
        backend: ``"dali" | "torch" | "auto"``. ``auto`` uses DALI when ``nvidia.dali`` imports, else the
            torchvision DataLoader, and logs which one it chose.
        device: ``"cuda" | "cuda:<i>" | "cpu" | "auto"``: where the batches end up. ``auto`` means the
            current CUDA device when CUDA is available, else the CPU. With DALI, ``cuda`` runs the GPU
            graph ("mixed" decoding, GPU augmentation); ``cpu`` runs the same graph with CPU operators
            (``device_id=None``).
        batch_size: Samples per batch per rank (training split).
        val_batch_size: Samples per batch per rank for the validation split; 0 means ``batch_size``.
        num_workers: torch: DataLoader worker processes (0 decodes in the main process). DALI: CPU
            threads of the pipeline (at least 1), which also read the encoded files.
        prefetch: Batches prepared ahead (DALI prefetch queue depth; DataLoader ``prefetch_factor``).
        pin_memory: Pin host batches before the copy to the GPU (torch backend; ignored on CPU).

    Augmentation (training split)
        img_size: Output side length in pixels (square crops) for both splits.
        scale: Random-resized-crop area range, as fractions of the image area (DeiT: ``(0.08, 1.0)``).
        ratio: Random-resized-crop aspect-ratio range, width / height (DeiT: ``(3/4, 4/3)``).
        interpolation: ``"bilinear" | "bicubic"``, used by every resize (antialiased when shrinking).
        hflip: Probability of a horizontal flip.
        randaugment: Number of RandAugment operations per image (timm's ``n``); 0 turns RandAugment off.
            The policy is timm's ``rand-m<M>-mstd<S>-inc<0|1>`` (DeiT: ``rand-m9-mstd0.5-inc1``): each
            of the ``n`` operations is drawn uniformly (with replacement) from timm's 15 operations and
            applied with probability 0.5. torch backend: timm's own ``rand_augment_transform`` (its posterize
            taking 0 bits, which ``inc1`` asks for at magnitude 10 and Pillow refuses, as a black image); DALI:
            the same operations, arguments and draws, built from ``nvidia.dali.auto_aug`` blocks.
        randaugment_magnitude: timm's magnitude ``M`` on its 0..10 scale (10 = strongest).
        randaugment_mstd: timm's ``mstd``: each operation's magnitude is drawn from
            ``Normal(M, mstd)`` clipped to [0, 10]; 0 uses ``M`` as is.
        randaugment_increasing: timm's ``inc1`` operation set (posterize, solarize and the enhance
            operations grow stronger with the magnitude); False is ``inc0``.
        random_erasing: Probability of timm's ``RandomErasing`` per sample (DeiT: 0.25), on the target
            device after normalisation and before Mixup/CutMix (as in DeiT, whose erasing is the last step
            of the per-sample transform); each sample's erasing is seeded by ``(seed, epoch, data set
            index, copy)``. 0 turns it off.
        random_erasing_mode: ``"pixel" | "rand" | "const"`` as timm's ``RandomErasing`` ``mode``
            (``pixel``: per-pixel normal noise, the DeiT setting).
        repeated_augmentation: DeiT's repeated augmentation (``RASampler``) with this many copies of
            each sample per epoch (DeiT: 3), each copy augmented differently, the copies of a sample
            read by consecutive ranks; the epoch keeps its ordinary length (``N / world_size`` samples
            per rank), so an epoch sees about ``N / repeats`` distinct images. 1 turns it off.
        num_views: 1 for supervised training. >1 turns on the multi-view (SSL) mode:
            ``batch["images"]`` becomes a list of ``num_views`` tensors, each an independent
            random-resized-crop / flip / RandAugment / view augmentation of the same images. Mixup/CutMix
            must be off.

    Self-supervised view augmentation (training split; BYOL / MoCo-v3 style, after the crop and flip, in
    this order: colour jitter, grayscale, Gaussian blur, solarize). The fields ``gaussian_blur`` and
    ``solarize`` hold one probability for every view or one per view (BYOL's asymmetric views:
    ``gaussian_blur=(1.0, 0.1)``, ``solarize=(0.0, 0.2)``). torch backend: torchvision's own
    ``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur`` and ``RandomSolarize``; DALI: the same draws fed
    to ``brightness``, contrast (PIL's grey-mean centre, ``auto_aug``), ``saturation``,
    ``color_space_conversion`` and ``gaussian_blur`` operators, and the hue shift written in DALI arithmetic.
        color_jitter: torchvision ``ColorJitter(brightness, contrast, saturation, hue)`` strengths: factors
            uniform in ``[max(0, 1 - x), 1 + x]``, hue shift uniform in ``[-x, x]`` turns (x <= 0.5), the
            four operations in a random order; all 0 turns it off. The hue shift is torchvision's on a PIL
            image on both backends: PIL's 8-bit HSV, the hue byte shifted by ``int(255 * shift)`` modulo 256
            (a hue strength of 0 skips it, as torchvision does).
        color_jitter_p: Probability that a view is colour-jittered at all (BYOL: 0.8).
        grayscale: Probability of converting a view to grey (ITU-R 601 luma, kept as 3 channels; BYOL: 0.2).
        gaussian_blur: Probability of a Gaussian blur, per view; the kernel is a true Gaussian of
            ``2 * ceil(3 * blur_sigma[1]) + 1`` taps with mirrored borders (the official SimCLR/BYOL code uses
            PIL's box-filter approximation of the same Gaussian).
        blur_sigma: (min, max) of the blur's standard deviation in pixels, drawn uniformly (BYOL: 0.1-2.0).
        solarize: Probability of PIL's ``solarize`` at threshold 128 (values >= 128 inverted), per view.

    Decoding (both splits)
        max_image_pixels: Largest image (width x height) either backend decodes; a larger one is
            treated as corrupt (the ``corrupt`` policy applies) with a message naming this field.
            0 means no limit. Replaces PIL's own decompression-bomb limit, so that PIL and DALI accept
            the same files. Both backends apply the EXIF orientation.

    Validation split
        crop_pct: The shorter side is resized to ``floor(img_size / crop_pct)``, then the centre
            ``img_size`` square is cut (0.875 is the ImageNet convention). Must lie in (0, 1].

    Mixup / CutMix (timm semantics, applied on the target device after normalisation)
        mixup: Mixup alpha (Beta(alpha, alpha)); 0 disables Mixup.
        cutmix: CutMix alpha; 0 disables CutMix.
        mixup_prob: Probability of mixing a batch at all.
        mixup_switch_prob: Probability of CutMix instead of Mixup when both are on.
        mixup_mode: ``"batch" | "pair" | "elem"`` as in ``timm.data.Mixup``.
        label_smoothing: Smoothing folded into the soft targets. Only used when Mixup or CutMix is on
            (without them the batch has hard labels only and smoothing is the loss's job).

    Output
        dtype: ``"float32" | "float16" | "bfloat16"``: the dtype of ``batch["images"]``.
        mean, std: Per-channel normalisation in 0..1 units (the student's ``pretrained_cfg``).

    Order, sharding, resumption
        seed: Base seed. The per-epoch permutation is seeded by ``(seed, epoch)`` and is the same on
            every rank. Each sample's augmentation (crop, flip, RandAugment) is seeded by ``(seed, epoch,
            data set index)`` and each batch's Mixup/CutMix by ``(seed, epoch, batch position)``, on both
            backends: the number of workers or threads and the point where a run resumed change nothing.
        shuffle: Shuffle each epoch; ``None`` means True for ``train`` and False for ``val``.
        shard_policy: How ``N`` samples are split over ``W`` ranks so that all ranks have the same
            number of samples (and therefore batches): ``"pad"`` repeats the first ``W*ceil(N/W) - N``
            samples of the epoch order (flagged in ``batch["is_pad"]``, so an evaluator can drop them
            and count every sample exactly once); ``"drop"`` leaves out the last ``N mod W`` samples of
            the epoch order (a different few each epoch when shuffling). Each rank takes every W-th
            sample of the (padded) epoch order, starting at its rank.
        drop_last: Drop each rank's last incomplete batch (its samples are then unseen that epoch).
        corrupt: What to do with an image that cannot be read or decoded: ``"skip"`` (the batch gets
            one sample fewer), ``"replace"`` (the next readable sample in data set order takes its
            place), ``"error"`` (raise, naming the file). Every bad file is logged once and counted in
            ``loader.corrupt`` (totals: ``loader.corrupt_summary()``, kept across a resume); the number of
            batches per epoch never changes. Bad means unreadable, truncated, not an image, a JPEG whose
            marker structure is damaged (a marker inside the compressed data, missing or out-of-order
            restart markers: both decoders would decode it as garbage without a word), or a decode error.
        hw_decoder_load: DALI "mixed" decoding only: share of JPEGs sent to the hardware JPEG decoder
            (A100/H100 have one); ignored on the CPU.
        extra: Free-form notes that travel with the config (a recipe's comments); the loaders ignore it.
    """

    root: str = ""
    train_path: str = ""
    val_path: str = ""
    source: str = "auto"
    num_classes: int = 0
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 128
    val_batch_size: int = 0
    num_workers: int = 4
    prefetch: int = 2
    pin_memory: bool = True
    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bilinear"
    hflip: float = 0.5
    randaugment: int = 0
    randaugment_magnitude: float = 9
    randaugment_mstd: float = 0.5
    randaugment_increasing: bool = True
    random_erasing: float = 0.0
    random_erasing_mode: str = "pixel"
    repeated_augmentation: int = 1
    max_image_pixels: int = 2**28
    num_views: int = 1
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    color_jitter_p: float = 1.0
    grayscale: float = 0.0
    gaussian_blur: tuple[float, ...] = (0.0,)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: tuple[float, ...] = (0.0,)
    crop_pct: float = 0.875
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    label_smoothing: float = 0.0
    dtype: str = "float32"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    seed: int = 0
    shuffle: bool | None = None
    shard_policy: str = "pad"
    drop_last: bool = False
    corrupt: str = "skip"
    hw_decoder_load: float = 0.65
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_any(cls, cfg: DataConfig | Mapping[str, Any] | Any | None) -> DataConfig:
        """A validated copy of ``cfg``: a DataConfig, a dict with the same keys, or another dataclass
        whose fields are a subset of DataConfig's (for example one embedded in the engine config)."""
        if cfg is None:
            values: dict[str, Any] = {}
        elif isinstance(cfg, DataConfig):
            values = dataclasses.asdict(cfg)
        elif isinstance(cfg, Mapping):
            values = dict(cfg)
        elif dataclasses.is_dataclass(cfg):
            values = dataclasses.asdict(cfg)
        else:
            raise TypeError(f"cfg: expected a DataConfig, a dict or a dataclass, got {type(cfg).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DataConfig: unknown field(s) {unknown}; valid fields: {sorted(known)}")
        for key in ("scale", "ratio", "mean", "std", "color_jitter", "gaussian_blur", "blur_sigma", "solarize"):
            if key in values and isinstance(values[key], (int, float)) and key in ("gaussian_blur", "solarize"):
                values[key] = (values[key],)  # one probability for every view
            if key in values and values[key] is not None and not isinstance(values[key], (str, bytes)):
                values[key] = tuple(float(v) for v in values[key])
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that holds an unusable value."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"DataConfig.{name}={getattr(self, name)!r}: {why}")

        for name, choices in (
            ("backend", BACKENDS),
            ("source", SOURCES),
            ("dtype", DTYPES),
            ("shard_policy", SHARD_POLICIES),
            ("corrupt", CORRUPT_POLICIES),
            ("interpolation", INTERPOLATIONS),
            ("mixup_mode", MIXUP_MODES),
            ("random_erasing_mode", ERASING_MODES),
        ):
            if getattr(self, name) not in choices:
                bad(name, f"must be one of {list(choices)}")
        dev = self.device
        if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
            bad("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
        for name in ("batch_size", "img_size", "num_views", "prefetch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if not isinstance(self.repeated_augmentation, int) or self.repeated_augmentation < 1:
            bad("repeated_augmentation", "must be a positive integer (1 turns it off)")
        for name in ("val_batch_size", "num_workers", "num_classes", "randaugment", "max_image_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if not 0 <= self.randaugment_magnitude <= 10:
            bad("randaugment_magnitude", "must lie in [0, 10] (timm's magnitude scale)")
        if not self.randaugment_mstd >= 0:
            bad("randaugment_mstd", "must be >= 0 (0 turns the magnitude noise off)")
        if not 0.0 < self.crop_pct <= 1.0:
            bad("crop_pct", "must lie in (0, 1]")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            bad("scale", "must be (min, max) with 0 < min <= max <= 1")
        if len(self.ratio) != 2 or not 0.0 < self.ratio[0] <= self.ratio[1]:
            bad("ratio", "must be (min, max) with 0 < min <= max")
        probabilities = ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob", "label_smoothing",
                         "hw_decoder_load", "color_jitter_p", "grayscale")
        for name in probabilities:
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                bad(name, "must lie in [0, 1]")
        for name in ("mixup", "cutmix"):
            if float(getattr(self, name)) < 0.0:
                bad(name, "must be >= 0 (0 disables it)")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                bad(name, "must have 3 values (R, G, B)")
        if min(self.std) <= 0:
            bad("std", "every value must be > 0")
        if len(self.color_jitter) != 4 or min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            bad("color_jitter", "must be (brightness, contrast, saturation, hue) strengths >= 0, hue <= 0.5")
        for name in ("gaussian_blur", "solarize"):
            probs = getattr(self, name)
            if len(probs) not in (1, self.num_views) or not all(0.0 <= p <= 1.0 for p in probs):
                bad(name, f"must be one probability in [0, 1] or one per view (num_views={self.num_views})")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            bad("blur_sigma", "must be (min, max) with 0 < min <= max")
        if self.num_views > 1 and self.mixing:
            bad("num_views", "multi-view (SSL) mode cannot be combined with mixup/cutmix; set both to 0")

    @property
    def mixing(self) -> bool:
        """True when Mixup or CutMix is on (the batches then carry soft ``targets``)."""
        return self.mixup > 0 or self.cutmix > 0

    def view_probability(self, name: str, view: int) -> float:
        """``gaussian_blur`` or ``solarize`` probability of view ``view`` (one value serves every view)."""
        probs = getattr(self, name)
        return float(probs[view if len(probs) > 1 else 0])

    @property
    def blur_kernel_size(self) -> int:
        """Taps of the Gaussian blur kernel: ``2 * ceil(3 * blur_sigma[1]) + 1`` (covers +-3 sigma at most)."""
        import math

        return 2 * math.ceil(3 * self.blur_sigma[1]) + 1

    def batch_size_for(self, split: str) -> int:
        return (self.val_batch_size or self.batch_size) if split == "val" else self.batch_size

    def shuffle_for(self, split: str) -> bool:
        return (split == "train") if self.shuffle is None else bool(self.shuffle)

    def resize_size(self) -> int:
        """Validation: length the shorter side is resized to before the centre crop."""
        import math

        return int(math.floor(self.img_size / self.crop_pct))
