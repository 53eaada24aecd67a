"""Dataset adapters: a user's copy of a public deepfake dataset -> labelled, split `Source`s.

Every adapter reads the dataset's own layout and official splits where they exist; where a dataset
has no validation split one is made deterministically (a hash of the grouping key, so identities
or source videos never straddle splits). Missing or malformed files raise `DatasetError` listing
their paths: nothing is skipped silently.

Labels: 0 = real, 1 = fake.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
FFPP_QUALITY = {"hq": "c23", "lq": "c40", "c23": "c23", "c40": "c40", "raw": "raw", "c0": "raw"}
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset copy with missing or malformed files (the message lists their paths)."""

    def __init__(self, what: str, paths: Iterable[object]):
        paths = [str(p) for p in paths]
        shown = "\n  ".join(paths[:20])
        more = f"\n  ... and {len(paths) - 20} more" if len(paths) > 20 else ""
        super().__init__(f"{what} ({len(paths)}):\n  {shown}{more}")
        self.paths = paths


@dataclass(frozen=True)
class Source:
    """One video (or frame sequence, or still image) to prepare."""

    id: str  # unique within the dataset, also the cache folder name
    path: Path  # video file, tar.gz archive, or image file
    label: int
    split: str
    kind: Literal["video", "frames", "image"] = "video"
    method: str = ""  # e.g. "youtube", "Deepfakes", "real_train"
    frames: tuple[str, ...] = ()  # for kind="frames": archive members in frame order
    dataset: str = ""  # which dataset it came from (set by `load_sources`; reports break down by it)
    group: str = ""  # source video it shares with others (a fake and its real); "" = its own


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) for `key` (stable across runs and machines)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) / float(16**12)


def hash_split(key: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    u = hash_fraction(key)
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def _require_dirs(root: Path, names: Iterable[str]) -> None:
    if not root.is_dir():
        raise DatasetError("dataset root is not a directory", [root])
    missing = [root / n for n in names if not (root / n).is_dir()]
    if missing:
        raise DatasetError("missing dataset folders", missing)


def _check_files(sources: list[Source]) -> list[Source]:
    missing = sorted({s.path for s in sources if not s.path.is_file()})
    if missing:
        raise DatasetError("missing files", missing)
    ids = [s.id for s in sources]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DatasetError("duplicate ids", dup)
    return sources


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"missing {what}", [path]) from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{what} is not JSON ({exc})", [path]) from None


# ----------------------------------------------------------------------------- FaceForensics++
def _ffpp_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = _read_json(path, "FaceForensics++ split file")
    ok = isinstance(pairs, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(i, str) and i.isdigit() for i in p)
        for p in pairs)
    if not ok:
        raise DatasetError("split file must be a JSON list of [\"NNN\", \"NNN\"] id pairs", [path])
    return [(a, b) for a, b in pairs]


def ffpp(root: Path, compression: str = "c23", methods: Iterable[str] = FFPP_METHODS,
         splits_dir: Optional[Path] = None) -> list[Source]:
    """FaceForensics++: official split files (`train.json`, `val.json`, `test.json`, default
    `<root>/splits`) list [target, source] id pairs; each pair contributes both real videos and
    both manipulated orders (`TTT_SSS`, `SSS_TTT`) of every method. HQ = c23, LQ = c40."""
    root = Path(root)
    comp = FFPP_QUALITY.get(compression.lower())
    if comp is None:
        raise ValueError(f"unknown FaceForensics++ compression {compression!r}: use c23/HQ, c40/LQ or raw")
    methods = tuple(methods)
    unknown = set(methods) - set(FFPP_METHODS)
    if unknown:
        raise ValueError(f"unknown FaceForensics++ methods {sorted(unknown)}: use {FFPP_METHODS}")
    _require_dirs(root, [f"original_sequences/youtube/{comp}/videos"]
                  + [f"manipulated_sequences/{m}/{comp}/videos" for m in methods])
    splits_dir = Path(splits_dir) if splits_dir else root / "splits"
    sources: list[Source] = []
    seen: dict[str, str] = {}
    for split in SPLITS:
        for a, b in _ffpp_pairs(splits_dir / f"{split}.json"):
            for vid in (a, b):
                if seen.setdefault(vid, split) != split:
                    raise DatasetError(f"video {vid} is in both {seen[vid]} and {split}",
                                       [splits_dir / f"{split}.json"])
                sources.append(Source(f"youtube/{vid}", root / "original_sequences/youtube" / comp
                                      / "videos" / f"{vid}.mp4", 0, split, method="youtube",
                                      group=f"{a}_{b}"))
            for m in methods:
                for t, s in ((a, b), (b, a)):
                    sources.append(Source(f"{m}/{t}_{s}", root / "manipulated_sequences" / m / comp
                                          / "videos" / f"{t}_{s}.mp4", 1, split, method=m,
                                          group=f"{a}_{b}"))
    return _check_files(sources)


# ----------------------------------------------------------------------------- WildDeepfake
_FRAME_RE = re.compile(r"^(\d+)$")


def list_tar_sequences(archive: Path) -> dict[str, list[tuple[int, str]]]:
    """{sequence folder inside the archive: [(frame number, member name)] sorted} for PNG frames."""
    seqs: dict[str, list[tuple[int, str]]] = {}
    bad: list[str] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                if not m.isfile() or Path(m.name).name.startswith("."):
                    continue
                p = Path(m.name)
                match = _FRAME_RE.match(p.stem)
                if p.suffix.lower() != ".png" or match is None:
                    bad.append(f"{archive}:{m.name}")
                    continue
                seqs.setdefault(str(p.parent), []).append((int(match.group(1)), m.name))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"unreadable archive ({exc})", [archive]) from None
    if bad:
        raise DatasetError("archive members that are not PNG frames named by frame number", bad)
    if not seqs:
        raise DatasetError("archive holds no PNG frames", [archive])
    return {k: sorted(v) for k, v in sorted(seqs.items())}


def _archive_number(p: Path) -> int:
    stem = p.name[: -len(".tar.gz")]
    if not stem.isdigit():
        raise DatasetError("WildDeepfake archives must be named N.tar.gz", [p])
    return int(stem)


def wilddeepfake(root: Path, val_fraction: float = 0.1) -> list[Source]:
    """WildDeepfake: `real_train`, `fake_train`, `real_test`, `fake_test`, each of `N.tar.gz`
    archives holding one folder of numbered PNG frames per sequence. There is no official
    validation split: `val_fraction` of the training archives of each class (chosen by a hash of
    the archive name, so all sequences of one archive stay together) become `val`."""
    root = Path(root)
    subsets = ("real_train", "fake_train", "real_test", "fake_test")
    _require_dirs(root, subsets)
    sources: list[Source] = []
    for subset in subsets:
        label = 0 if subset.startswith("real") else 1
        archives = sorted(root.joinpath(subset).glob("*.tar.gz"), key=_archive_number)
        if not archives:
            raise DatasetError("no N.tar.gz archives", [root / subset])
        others = sorted(p for p in root.joinpath(subset).iterdir()
                        if p.is_file() and not p.name.endswith(".tar.gz") and not p.name.startswith("."))
        if others:
            raise DatasetError("unexpected files (expected N.tar.gz archives)", others)
        val: set[Path] = set()
        if subset.endswith("train"):
            k = max(1, math.ceil(val_fraction * len(archives))) if val_fraction > 0 else 0
            val = set(sorted(archives, key=lambda p: hash_fraction(f"{subset}/{p.name}"))[:k])
            if k >= len(archives):
                raise DatasetError(f"too few archives for a validation split of {val_fraction}",
                                   [root / subset])
        for archive in archives:
            split = "val" if archive in val else subset.split("_")[1]
            n = _archive_number(archive)
            for seq, frames in list_tar_sequences(archive).items():
                sources.append(Source(f"{subset}/{n}/{seq}", archive, label, split, "frames",
                                      subset, tuple(name for _, name in frames)))
    return _check_files(sources)


# ----------------------------------------------------------------------------- Celeb-DF v2
def celebdf(root: Path, val_fraction: float = 0.1) -> list[Source]:
    """Celeb-DF v2: `List_of_testing_videos.txt` lines `<label> <relative path>` with label 1 =
    REAL (the dataset's convention) are the test split; all other videos of `Celeb-real`,
    `YouTube-real` (real) and `Celeb-synthesis` (fake) are train, with a hash-chosen val part by
    identity (`idN`) so an identity never straddles train and val."""
    root = Path(root)
    folders = {"Celeb-real": 0, "YouTube-real": 0, "Celeb-synthesis": 1}
    _require_dirs(root, folders)
    listing = root / "List_of_testing_videos.txt"
    if not listing.is_file():
        raise DatasetError("missing Celeb-DF test list", [listing])
    test: dict[str, int] = {}
    bad = []
    for i, line in enumerate(listing.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[0] not in ("0", "1"):
            bad.append(f"{listing}:{i}: {line!r}")
            continue
        test[parts[1]] = 0 if parts[0] == "1" else 1
    if bad:
        raise DatasetError("malformed lines (expected '<0|1> <path>', 1 = real)", bad)
    sources = []
    for folder, label in folders.items():
        for p in sorted(root.joinpath(folder).glob("*.mp4")):
            rel = f"{folder}/{p.name}"
            if rel in test:
                if test[rel] != label:
                    raise DatasetError(f"test list label contradicts folder for {rel}", [listing])
                split = "test"
            else:
                split = hash_split(p.stem.split("_")[0], val_fraction)
            sources.append(Source(f"{folder}/{p.stem}", p, label, split, method=folder))
    listed = {s.id + ".mp4" for s in sources}
    absent = [root / r for r in test if r not in listed]
    if absent:
        raise DatasetError("videos named in the test list are missing", absent)
    return _check_files(sources)


# ----------------------------------------------------------------------------- DFD
def dfd(root: Path, compression: str = "c23") -> list[Source]:
    """Google/Jigsaw DeepFakeDetection (DFD), used as a test set: real `actors` videos and fake
    `DeepFakeDetection` videos, either in the FaceForensics++ download layout
    (`original_sequences/actors/<comp>/videos`, `manipulated_sequences/DeepFakeDetection/<comp>/videos`)
    or as plain `actors/` and `DeepFakeDetection/` folders."""
    root = Path(root)
    comp = FFPP_QUALITY.get(compression.lower(), compression)
    sources = []
    for name, label, nested in (("actors", 0, f"original_sequences/actors/{comp}/videos"),
                                ("DeepFakeDetection", 1,
                                 f"manipulated_sequences/DeepFakeDetection/{comp}/videos")):
        candidates = [root / nested, root / name / comp / "videos", root / name]
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            raise DatasetError("missing DFD folder (looked for)", candidates)
        videos = sorted(folder.glob("*.mp4"))
        if not videos:
            raise DatasetError("no .mp4 videos", [folder])
        sources += [Source(f"{name}/{p.stem}", p, label, "test", method=name) for p in videos]
    return _check_files(sources)


# ----------------------------------------------------------------------------- DFDC
def _dfdc_label(value: object, where: str, bad: list[str]) -> int:
    v = str(value).strip().upper()
    if v in ("REAL", "0"):
        return 0
    if v in ("FAKE", "1"):
        return 1
    bad.append(f"{where}: label {value!r}")
    return -1


def dfdc(root: Path, val_fraction: float = 0.05) -> list[Source]:
    """DFDC: `dfdc_train_part_N/metadata.json` ({file: {label: REAL|FAKE, original}}) are train,
    with a hash-chosen val part keyed by the original (real) video so fakes stay with their
    source; `labels.csv` (filename,label with 1 = fake) at `<root>/test/` or `<root>/` with its
    videos beside it or in `videos/` is the test split."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("dataset root is not a directory", [root])
    sources: list[Source] = []
    bad: list[str] = []
    for part in sorted(root.glob("dfdc_train_part_*")):
        meta = part / "metadata.json"
        entries = _read_json(meta, "DFDC metadata")
        if not isinstance(entries, dict):
            raise DatasetError("metadata must map file names to {label, original}", [meta])
        for name, info in sorted(entries.items()):
            if not isinstance(info, dict):
                bad.append(f"{meta}: {name}")
                continue
            label = _dfdc_label(info.get("label"), f"{meta}: {name}", bad)
            key = name if label == 0 else str(info.get("original") or name)
            sources.append(Source(f"{part.name}/{Path(name).stem}", part / name, label,
                                  hash_split(key, val_fraction), method=part.name, group=key))
    labels = next((p for p in (root / "test" / "labels.csv", root / "labels.csv") if p.is_file()), None)
    if labels is not None:
        with labels.open(newline="") as f:
            for i, row in enumerate(csv.DictReader(f), 2):
                name = row.get("filename") or row.get("file")
                if not name or row.get("label") is None:
                    bad.append(f"{labels}:{i}: {row}")
                    continue
                label = _dfdc_label(row["label"], f"{labels}:{i}", bad)
                path = labels.parent / name
                if not path.exists() and (labels.parent / "videos" / name).exists():
                    path = labels.parent / "videos" / name
                sources.append(Source(f"test/{Path(name).stem}", path, label, "test", method="test"))
    if bad:
        raise DatasetError("malformed DFDC entries", bad)
    if not sources:
        raise DatasetError("no dfdc_train_part_*/metadata.json and no labels.csv", [root])
    return _check_files(sources)


# ----------------------------------------------------------------------------- plain layouts
def _kind(p: Path) -> str:
    ext = p.suffix.lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else ""


def _media(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    unknown = [p for p in files if not _kind(p)]
    if unknown:
        raise DatasetError("files that are neither videos nor images", unknown)
    if not files:
        raise DatasetError("no videos or images", [folder])
    return files


def folder(root: Path, val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[Source]:
    """`real/` and optionally `fake/` holding videos or images (`fake/` may be absent for
    self-blended training). With `train/`, `val/`, `test/` subfolders above them those are the
    splits; otherwise each file is assigned by a hash of its relative path."""
    root = Path(root)
    split_dirs = [s for s in SPLITS if (root / s).is_dir()]
    groups = [(s, root / s) for s in split_dirs] if split_dirs else [(None, root)]
    sources = []
    for split, base in groups:
        if not (base / "real").is_dir():
            raise DatasetError("missing real/ folder", [base / "real"])
        for name, label in (("real", 0), ("fake", 1)):
            if not (base / name).is_dir():
                continue
            for p in _media(base / name):
                rel = p.relative_to(root).as_posix()
                sources.append(Source(rel.rsplit(".", 1)[0], p, label,
                                      split or hash_split(rel, val_fraction, test_fraction),
                                      _kind(p), name))
    return _check_files(sources)


def images(root: Path, val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[Source]:
    """A folder of real face photos only (e.g. for self-blended training), hash-split."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("dataset root is not a directory", [root])
    return _check_files([Source(p.relative_to(root).as_posix().rsplit(".", 1)[0], p, 0,
                                hash_split(p.relative_to(root).as_posix(), val_fraction, test_fraction),
                                "image", "real") for p in _media(root)])


def csv_list(path: Path, val_fraction: float = 0.1, test_fraction: float = 0.1,
             dev_fraction: float = 0.0) -> list[Source]:
    """A CSV with header `path,label[,split][,group]`; label real/fake or 0/1; relative paths
    are relative to the CSV's folder. `group` (e.g. the source video of a fake) keeps related
    files in one split: rows without a split are hash-split by group (else by path).

    `dev_fraction` > 0 carves a validation split out of the CSV's train rows (by group hash) and
    turns the CSV's own val rows into test: early stopping and calibration then never see the
    published validation set, which stays a held-out measurement."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("missing CSV file", [path])
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    sources, bad = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError("CSV needs a header with path,label[,split][,group]", [path])
        for i, row in enumerate(reader, 2):
            label = {"real": 0, "0": 0, "fake": 1, "1": 1}.get(str(row["label"]).strip().lower())
            key = (row.get("group") or "").strip() or row["path"]
            split = (row.get("split") or "").strip() or hash_split(key, val_fraction, test_fraction)
            if dev_fraction and split in ("train", "val"):
                split = ("val" if hash_fraction("dev|" + key) < dev_fraction else "train") \
                    if split == "train" else "test"
            media = path.parent / row["path"]
            if label is None or split not in SPLITS or not _kind(media):
                bad.append(f"{path}:{i}: {row}")
                continue
            sources.append(Source(row["path"].rsplit(".", 1)[0], media, label, split, _kind(media),
                                  group=(row.get("group") or "").strip()))
    if bad:
        raise DatasetError("malformed CSV rows (label real/fake/0/1, split train/val/test, "
                           "a video or image path)", bad)
    return _check_files(sources)


ADAPTERS: dict[str, Callable[..., list[Source]]] = {
    "ffpp": ffpp, "wilddeepfake": wilddeepfake, "celebdf": celebdf, "dfd": dfd, "dfdc": dfdc,
    "folder": folder, "images": images, "csv": csv_list,
}


def load_sources(dataset: str, root: Path, name: Optional[str] = None, **options) -> list[Source]:
    """Sources of `dataset` (one of `ADAPTERS`) at `root`, tagged `name` (default: the adapter's
    name); `options` go to the adapter."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {sorted(ADAPTERS)}")
    tag = name or dataset
    return [replace(s, dataset=tag) for s in ADAPTERS[dataset](Path(root), **options)]


def combine(parts: list[list[Source]]) -> list[Source]:
    """Sources of several datasets prepared together (ids must stay unique)."""
    return _check_files([s for part in parts for s in part])
