"""Where samples come from: ImageFolder trees, file lists and webdataset tar shards.

A source is an indexed list of encoded images plus integer labels. Both backends read the same
source object, so the sample order, the class mapping and the handling of unreadable files are
identical whichever backend decodes the bytes.
"""

from __future__ import annotations

import glob
import math
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
        return jpeg_structure_problem(data)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        if bytes(data[max(0, n - 64) :]).find(b"IEND") < 0:
            return "truncated PNG (no IEND chunk)"
        return None
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    if head[:1] == b"P" and head[1:2] in b"123456":
        return None
    return "not a supported image format"


# markers that may follow a scan (JPEG, ITU T.81 B.2.4): DHT, DAC, SOS, DQT, DNL, DRI, COM, APPn, EOI
_AFTER_SCAN = frozenset([0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, 0xD9, *range(0xE0, 0xF0)])
_SOF_WITH_MCUS = frozenset([0xC0, 0xC1, 0xC2])  # baseline, extended and progressive DCT frames


def jpeg_structure_problem(data: bytes | memoryview) -> str | None:
    """Why a JPEG's marker structure is damaged, or ``None``: segments that overrun the file, a
    marker inside the compressed scan data that cannot be there, restart markers out of sequence or
    fewer/more of them than the frame has restart intervals, no scan before the end-of-image marker.

    Neither PIL nor DALI's decoders report such damage: libjpeg only warns ("Corrupt JPEG data: ...")
    and both decode the image on, as garbage. The check looks at the markers only (one vectorised pass
    over the file, a few per cent of the time a CPU decode takes); damage that leaves them intact (bit flips
    or zeroed bytes in a scan without restart markers) is not found here, nor by those decoders.
    """
    raw = bytes(data)
    n = len(raw)
    pos, scans, restart, sof = 2, 0, 0, 0
    frame: tuple[int, int, dict[int, tuple[int, int]]] | None = None  # height, width, id -> (h, v)
    marks = None  # every 0xFF after the first scan header: position, next byte, "ends a scan"
    while True:
        if pos >= n or raw[pos] != 0xFF:
            return f"damaged JPEG (no marker where one is due, byte {pos})"
        while pos < n and raw[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = raw[pos] if pos < n else -1
        pos += 1
        if marker == 0xD9:
            return None if scans else "damaged JPEG (no scan before the end-of-image marker)"
        if pos + 2 > n:
            return "truncated JPEG (ends inside a marker)"
        length = raw[pos] << 8 | raw[pos + 1]
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8 or length < 2 or pos + length > n:
            return f"damaged JPEG (marker 0xFF{marker:02X} at byte {pos - 2} is broken)"
        body = raw[pos + 2 : pos + length]
        pos += length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(body) >= 6:
            sof = marker
            comps = {body[6 + 3 * k]: (body[7 + 3 * k] >> 4, body[7 + 3 * k] & 15) for k in range((len(body) - 6) // 3)}
            frame = (body[1] << 8 | body[2], body[3] << 8 | body[4], comps)
        elif marker == 0xDD and len(body) >= 2:
            restart = body[0] << 8 | body[1]
        elif marker == 0xDA:
            scans += 1
            if marks is None:  # one vectorised pass over the rest of the file serves every scan
                a = np.frombuffer(raw, dtype=np.uint8)
                ff = np.flatnonzero(a[pos : n - 1] == 0xFF) + pos
                nxt = a[ff + 1]
                marks = (ff, nxt, ~(((nxt >= 0xD0) & (nxt <= 0xD7)) | (nxt == 0x00) | (nxt == 0xFF)))
            first = int(np.searchsorted(marks[0], pos))
            stops = np.flatnonzero(marks[2][first:])
            if not len(stops):
                return "truncated JPEG (the scan data runs to the end of the file)"
            last = first + int(stops[0])
            end = int(marks[0][last])
            if raw[end + 1] not in _AFTER_SCAN:
                return f"damaged JPEG scan data (marker 0xFF{raw[end + 1]:02X} inside the compressed data)"
            inside = marks[1][first:last]
            rst = inside[(inside >= 0xD0) & (inside <= 0xD7)].astype(np.int64) - 0xD0
            if np.any(rst != np.arange(len(rst)) % 8):
                return "damaged JPEG scan data (restart markers out of sequence)"
            ids = list(body[1 : 1 + 2 * body[0] : 2]) if body else []
            expected = _restart_markers(frame, ids, restart) if sof in _SOF_WITH_MCUS else None
            if expected is not None and len(rst) != expected:
                return f"damaged JPEG scan data ({len(rst)} restart markers where the frame has {expected})"
            pos = end


def _restart_markers(frame, ids: list[int], restart: int) -> int | None:
    """Restart markers a scan of ``ids`` must hold, or None when that cannot be told from the headers."""
    if not restart or frame is None or not frame[0] or not ids or any(c not in frame[2] for c in ids):
        return None
    height, width, comps = frame
    hmax = max(h for h, _ in comps.values())
    vmax = max(v for _, v in comps.values())
    if len(ids) == 1:  # non-interleaved: one block per MCU, over the component's own size
        h, v = comps[ids[0]]
        mcus = math.ceil(math.ceil(width * h / hmax) / 8) * math.ceil(math.ceil(height * v / vmax) / 8)
    else:
        mcus = math.ceil(width / (8 * hmax)) * math.ceil(height / (8 * vmax))
    return max(0, math.ceil(mcus / restart) - 1)


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
