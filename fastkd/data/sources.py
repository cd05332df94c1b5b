"""Where samples come from: ImageFolder trees, file lists and webdataset tar shards.

A source is an indexed list of encoded images plus integer labels. Both backends read the same
source object, so the sample order, the class mapping and the handling of unreadable files are
identical whichever backend decodes the bytes.
"""

from __future__ import annotations

import glob
import os
import tarfile
import threading

import numpy as np

from fastkd.data.config import DataConfig

# formats both DALI's decoders and PIL read (no GIF: DALI has no GIF decoder)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def encoded_problem(data: bytes | memoryview) -> str | None:
    """Cheap check of an encoded image before decoding: ``None`` when it looks complete, else why not.

    It catches empty files, non-image bytes and truncated JPEG/PNG files (the usual result of an
    interrupted copy) without decoding anything; what passes can still fail in the decoder.
    """
    n = len(data)
    if n == 0:
        return "empty file"
    head = bytes(data[:12])
    if head[:3] == b"\xff\xd8\xff":
        # libjpeg stops at the end-of-image marker; some writers append a few bytes after it
        if bytes(data[max(0, n - 65536) :]).rfind(b"\xff\xd9") < 0:
            return "truncated JPEG (no end-of-image marker)"
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        if bytes(data[max(0, n - 64) :]).find(b"IEND") < 0:
            return "truncated PNG (no IEND chunk)"
        return None
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    if head[:1] == b"P" and head[1:2] in b"123456":
        return None
    return "not a supported image format"


class Source:
    """An indexed list of ``(encoded image, label)`` samples."""

    kind = "base"

    def __init__(self, names: list[str], labels: np.ndarray, classes: list[str] | None) -> None:
        self.names = names
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> bytes:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return self.names[index]

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return int(self.labels.max()) + 1 if len(self.labels) else 0


class FileSource(Source):
    """Samples that are plain files (ImageFolder trees and file lists)."""

    def read(self, index: int) -> bytes:
        with open(self.names[index], "rb") as f:
            return f.read()


class FolderSource(FileSource):
    kind = "folder"


class FileListSource(FileSource):
    kind = "filelist"


class TarSource(Source):
    """Webdataset shards: each sample is ``<key>.<image ext>`` plus ``<key>.cls`` in one tar.

    The tars are indexed once (member offsets and sizes) and samples are read with ``os.pread``, so
    any order, any shard of the samples and a resumed position cost no sequential scan.
    """

    kind = "webdataset"

    def __init__(self, tars: list[str], tar_ids, offsets, sizes, names, labels) -> None:
        super().__init__(names, labels, None)
        self.tars = tars
        self.tar_ids = np.asarray(tar_ids, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _fd(self, tar_id: int) -> int:
        with self._lock:
            if self._pid != os.getpid():  # forked into a DataLoader worker: open our own descriptors
                self._fds, self._pid = {}, os.getpid()
            fd = self._fds.get(tar_id)
            if fd is None:
                fd = self._fds[tar_id] = os.open(self.tars[tar_id], os.O_RDONLY)
            return fd

    def read(self, index: int) -> bytes:
        size = int(self.sizes[index])
        data = os.pread(self._fd(int(self.tar_ids[index])), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"short read in {self.describe(index)}")
        return data

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()


# ----------------------------------------------------------------------------------------------------------
# discovery


def _list_images(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS))
    return sorted(out)


def folder_classes(path: str) -> list[str]:
    """Class names of an ImageFolder tree: its sub-folders in sorted order."""
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder {path!r} has no class sub-folders (expected <root>/<class>/<image>)")
    return classes


def open_folder(path: str, classes: list[str] | None = None) -> FolderSource:
    own = folder_classes(path)
    classes = own if classes is None else classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(own) - set(index))
    if unknown:
        raise ValueError(f"ImageFolder {path!r} has class folders {unknown[:5]} that the train split lacks")
    names, labels = [], []
    for c in own:
        files = _list_images(os.path.join(path, c))
        names.extend(files)
        labels.extend([index[c]] * len(files))
    if not names:
        raise ValueError(f"ImageFolder {path!r} holds no images with extensions {IMG_EXTENSIONS}")
    return FolderSource(names, np.asarray(labels), classes)


def open_filelist(path: str) -> FileListSource:
    base = os.path.dirname(os.path.abspath(path))
    names, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise ValueError(f"file list {path!r} line {lineno}: expected '<path> <label>', got {line!r}")
            names.append(parts[0] if os.path.isabs(parts[0]) else os.path.join(base, parts[0]))
            labels.append(int(parts[1]))
    if not names:
        raise ValueError(f"file list {path!r} is empty")
    return FileListSource(names, np.asarray(labels), None)


def _split_key(member_name: str) -> tuple[str, str]:
    folder, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def open_tars(tars: list[str]) -> TarSource:
    tar_ids, offsets, sizes, names, labels = [], [], [], [], []
    for t, tar_path in enumerate(tars):
        images: dict[str, tarfile.TarInfo] = {}
        classes: dict[str, int] = {}
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if ext in WDS_IMAGE_EXTS and key not in images:
                    images[key] = m
                elif ext == "cls":
                    text = tf.extractfile(m).read().decode().strip()
                    if not text.isdigit():
                        raise ValueError(f"{tar_path}: {m.name} holds {text!r}, expected a class index")
                    classes[key] = int(text)
        for key in images:  # tar order
            if key not in classes:
                raise ValueError(f"{tar_path}: sample {key!r} has an image but no .cls member")
            m = images[key]
            tar_ids.append(t)
            offsets.append(m.offset_data)
            sizes.append(m.size)
            names.append(f"{tar_path}:{m.name}")
            labels.append(classes[key])
    if not names:
        raise ValueError(f"webdataset shards {tars[:3]} hold no samples with extensions {WDS_IMAGE_EXTS} + .cls")
    return TarSource(tars, tar_ids, offsets, sizes, names, labels)


def _tar_list(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")))
    if any(ch in path for ch in "*?["):
        return sorted(glob.glob(path))
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(path + "-*.tar"))


def split_path(cfg: DataConfig, split: str) -> str:
    explicit = cfg.train_path if split == "train" else cfg.val_path
    if explicit:
        return explicit
    if not cfg.root:
        raise ValueError(f"DataConfig.root: empty and no {split}_path given; where is the {split} split?")
    folder, listing = os.path.join(cfg.root, split), os.path.join(cfg.root, f"{split}.txt")
    if cfg.source == "filelist" or (cfg.source == "auto" and not os.path.isdir(folder) and os.path.isfile(listing)):
        return listing
    return folder


def source_kind(cfg: DataConfig, path: str) -> str:
    if cfg.source != "auto":
        return cfg.source
    if os.path.isfile(path):
        return "webdataset" if path.endswith(".tar") else "filelist"
    if os.path.isdir(path):
        return "webdataset" if glob.glob(os.path.join(path, "*.tar")) else "folder"
    return "webdataset" if _tar_list(path) else "folder"


def open_source(cfg: DataConfig, split: str) -> Source:
    """The source of ``split`` (``"train"`` or ``"val"``) as ``cfg`` describes it."""
    path = split_path(cfg, split)
    kind = source_kind(cfg, path)
    field_name = f"{split}_path" if (cfg.train_path if split == "train" else cfg.val_path) else "root"
    if kind == "webdataset":
        tars = _tar_list(path)
        if not tars:
            raise FileNotFoundError(f"DataConfig.{field_name}: no .tar shards at {path!r}")
        src: Source = open_tars(tars)
    elif kind == "filelist":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DataConfig.{field_name}: file list {path!r} does not exist")
        src = open_filelist(path)
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"DataConfig.{field_name}: ImageFolder {path!r} does not exist")
        classes = None
        if split == "val":  # class indices come from the train split, so both splits agree
            try:
                train_path = split_path(cfg, "train")
                if os.path.isdir(train_path) and source_kind(cfg, train_path) == "folder":
                    classes = folder_classes(train_path)
            except ValueError:
                classes = None
        src = open_folder(path, classes)
    if cfg.num_classes and src.labels.max() >= cfg.num_classes:
        raise ValueError(
            f"DataConfig.num_classes={cfg.num_classes}: the {split} split has label {int(src.labels.max())}"
        )
    return src
