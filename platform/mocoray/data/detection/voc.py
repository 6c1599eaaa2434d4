"""Pascal VOC detection in its standard layout (VOCdevkit/VOC2007, VOC2012), read through fsspec.

    <root>/VOCdevkit/VOC<year>/Annotations/<id>.xml          (or <root>/VOC<year>/...)
    <root>/VOCdevkit/VOC<year>/ImageSets/Main/<split>.txt
    <root>/VOCdevkit/VOC<year>/JPEGImages/<id>.jpg

Several (year, split) sets are concatenated: the MoCo paper trains on 2007+2012 trainval and tests
on 2007 test. The classes are VOC's 20 unless the caller names others: `voc_class_list` picks them
from an explicit list, else from a `labels.txt` (one class per line) in a VOC<year> folder, the folder
above it (VOCdevkit/) or the root. VOC boxes are 1-based inclusive pixel indices; they become continuous coordinates
(x0 = xmin - 1, x1 = xmax), as detectron2 reads them. `difficult` objects stay as a flag (the VOC
metric ignores them: neither true nor false positives); training usually leaves them out
(`keep_difficult=False`).
"""

from __future__ import annotations

import logging
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fsspec import AbstractFileSystem

from ...config.detect import class_list_problem
from ..base import CorruptImageError, DatasetNotFoundError
from ..files import display, image_size, read_bytes, resolve
from .base import AnnotationCounts, FileDetections, ImageRecord, ItemTransform, clean_record, finish_records

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
log = logging.getLogger(__name__)
PAPER_TRAIN_SETS = (("2007", "trainval"), ("2012", "trainval"))
PAPER_TEST_SETS = (("2007", "test"),)
LABELS_FILE = "labels.txt"
CLASSES_SHOWN = 30  # an error lists this many class names at most


class UnreadableAnnotation(ValueError):
    """An annotation file that is missing or not VOC XML: the image is left out and counted."""


def parse_sets(sets: Sequence[str | Sequence[str]], field: str) -> list[tuple[str, str]]:
    """("2007", "trainval") pairs from pairs or from "2007-trainval" / "2007/trainval" strings."""
    out = []
    for s in sets:
        parts = s.replace("/", "-").split("-") if isinstance(s, str) else list(s)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{field}: {s!r} is not a VOC set; write it as YEAR-SPLIT, e.g. 2007-trainval")
        out.append((parts[0], parts[1]))
    if not out:
        raise ValueError(f"{field}: no VOC sets given (e.g. [2007-trainval, 2012-trainval])")
    return out


def _shown(names: Sequence[str]) -> str:
    more = len(names) - CLASSES_SHOWN
    return ", ".join(names[:CLASSES_SHOWN]) + (f", ... ({more} more)" if more > 0 else "")


@dataclass
class ClassList:
    """The classes a VOC dataset is read with (label i + 1 is names[i]) and where they came from."""

    names: list[str]
    source: str  # "data.classes", the labels.txt file(s) read, or the default's name
    note: str | None = None  # data.classes chosen over a labels.txt that lists other classes


def read_labels_file(fs: AbstractFileSystem, path: str) -> list[str]:
    """The class names of a labels.txt: one per line, blank lines and surrounding whitespace ignored."""
    try:
        text = read_bytes(fs, path).decode("utf-8-sig")  # a byte-order mark (Windows editors) is not a name
    except UnicodeDecodeError as err:
        raise ValueError(f"{display(fs, path)}: not UTF-8 text ({err})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    problem = class_list_problem(names)
    if problem:
        raise ValueError(f"{display(fs, path)}: {problem}")
    return names


def _labels_files(root: str, sets: Sequence[str | Sequence[str]], field: str) -> list[tuple[AbstractFileSystem, str]]:
    """The labels.txt files that belong to `sets` under `root`: in each VOC<year> folder, in the folder
    above it (VOCdevkit/, or the root) and in the root itself."""
    fs, base = resolve(root, field)
    folders = [_year_folder(fs, base, root, year, field) for year, _ in parse_sets(sets, field)]
    places = dict.fromkeys([base, *(posixpath.dirname(f) for f in folders), *folders])
    paths = [posixpath.join(place, LABELS_FILE) for place in places]
    return [(fs, p) for p in paths if fs.isfile(p)]


def voc_class_list(
    explicit: Sequence[str] | None, places: Sequence[tuple[str, Sequence[str | Sequence[str]], str]]
) -> ClassList:
    """The classes of a VOC dataset: `explicit` (data.classes) when given, else the labels.txt files of
    `places` ((root, sets, field) of each split; they must agree), else VOC's 20 classes."""
    found: dict[str, list[str] | None] = {}
    for root, sets, field in places:
        for fs, path in _labels_files(root, sets, field):
            where = display(fs, path)
            if where in found:
                continue
            try:
                found[where] = read_labels_file(fs, path)
            except ValueError:
                if explicit is None:
                    raise
                found[where] = None  # unusable, and overridden anyway: only noted
    if explicit is not None:
        names = [n.strip() for n in explicit]
        other = [path for path, listed in found.items() if listed != names]
        note = (f"data.classes ({len(names)} classes) is used; {', '.join(other)} "
                f"list{'s' if len(other) == 1 else ''} other classes and {'is' if len(other) == 1 else 'are'} "
                "ignored") if other else None
        return ClassList(names, "data.classes", note)
    if found:
        lists = list(found.items())
        for path, listed in lists[1:]:
            if listed != lists[0][1]:
                raise ValueError(f"{places[0][2]}: {lists[0][0]} ({_shown(lists[0][1])}) and {path} "
                                 f"({_shown(listed)}) list different classes; keep one labels.txt, or set "
                                 "data.classes (which takes precedence)")
        return ClassList(lists[0][1], ", ".join(found))  # type: ignore[arg-type]
    return ClassList(list(VOC_CLASSES), "VOC's 20 classes (no data.classes, no labels.txt)")


def _year_folder(fs: AbstractFileSystem, root: str, url: str, year: str, field: str) -> str:
    for candidate in (posixpath.join(root, "VOCdevkit", f"VOC{year}"), posixpath.join(root, f"VOC{year}")):
        if fs.isdir(candidate):
            return candidate
    raise DatasetNotFoundError(
        f"{field}: no VOC{year} folder under {url} (looked for {url}/VOCdevkit/VOC{year} and "
        f"{url}/VOC{year}, each holding Annotations/, ImageSets/Main/ and JPEGImages/)"
    )


def _split_ids(fs: AbstractFileSystem, folder: str, year: str, split: str, field: str) -> list[str]:
    main = posixpath.join(folder, "ImageSets", "Main")
    path = posixpath.join(main, f"{split}.txt")
    if not fs.isfile(path):
        lists = fs.glob(posixpath.join(main, "*.txt")) if fs.isdir(main) else []
        # <class>_<split>.txt are per-class lists, not splits
        available = sorted(posixpath.basename(p)[:-4] for p in lists if "_" not in posixpath.basename(p))
        raise DatasetNotFoundError(
            f"{field}: VOC{year} has no split {split!r}: {display(fs, path)} does not exist "
            f"(splits found: {', '.join(available) or 'none'})"
        )
    ids = [line.split()[0] for line in read_bytes(fs, path).decode().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{field}: VOC{year} split {split!r} is empty ({display(fs, path)} lists no images)")
    return ids


def _number(obj: ET.Element, name: str) -> float:
    try:
        return float(obj.findtext(name) or "nan")
    except ValueError:
        return float("nan")  # not a number: the box becomes degenerate and is counted as such


def parse_annotation(
    data: bytes, where: str, class_index: dict[str, int]
) -> tuple[int, int, list, list, list]:
    """(width, height, boxes, labels, difficult) of one VOC XML file; width/height 0 when not stated."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise UnreadableAnnotation(f"{where}: not XML ({err})") from err
    size = root.find("size")
    width = int(_number(size, "width")) if size is not None and _number(size, "width") > 0 else 0
    height = int(_number(size, "height")) if size is not None and _number(size, "height") > 0 else 0
    boxes, labels, difficult = [], [], []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise ValueError(f"{where}: object class {name!r} is not one of the {len(class_index)} classes "
                             f"({_shown(list(class_index))}); list the dataset's classes in data.classes "
                             f"or in a {LABELS_FILE} beside the annotations")
        bb = obj.find("bndbox")
        if bb is None:
            boxes.append([float("nan")] * 4)
        else:
            x0, y0, x1, y1 = (_number(bb, k) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x0 - 1, y0 - 1, x1, y1])
        labels.append(class_index[name])
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return width, height, boxes, labels, difficult


def voc_detection(
    root: str,
    sets: Sequence[str | Sequence[str]] = PAPER_TRAIN_SETS,
    *,
    keep_difficult: bool = True,
    skip_empty: bool = False,
    classes: Sequence[str] = VOC_CLASSES,
    transform: ItemTransform | None = None,
    field: str = "data.root",
    threads: int = 16,
) -> FileDetections:
    """The concatenation of VOC (year, split) sets under `root` (a local path or fsspec URL).

    Labels are 1 + the index in `classes`. Boxes reaching outside the image are clipped, degenerate
    ones dropped, and both counted in `.counts`; an image whose annotation file is missing or not
    XML is left out and counted; an object of an unknown class, a missing folder, split file or an
    empty split raise an error naming `field` and the path. `threads` reads the XML files in
    parallel (what makes an object store usable: VOC07+12 trainval is 16,551 files)."""
    fs, base = resolve(root, field)
    class_index = {c: i + 1 for i, c in enumerate(classes)}
    counts = AnnotationCounts()
    jobs = []
    for year, split in parse_sets(sets, field):
        folder = _year_folder(fs, base, root, year, field)
        jobs += [(folder, f"{year}-{split}", i) for i in _split_ids(fs, folder, year, split, field)]

    def read(job: tuple[str, str, str]) -> tuple[str, str, tuple | str]:
        folder, source, image = job
        xml = posixpath.join(folder, "Annotations", f"{image}.xml")
        jpg = posixpath.join(folder, "JPEGImages", f"{image}.jpg")
        try:
            parsed = parse_annotation(read_bytes(fs, xml), display(fs, xml), class_index)
            width, height, boxes, labels, difficult = parsed
            if not width or not height:
                width, height = image_size(fs, jpg)
        except (FileNotFoundError, UnreadableAnnotation, CorruptImageError) as err:
            return source, jpg, f"{type(err).__name__}: {err}"
        return source, jpg, (width, height, boxes, labels, difficult)

    records = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for source, jpg, parsed in pool.map(read, jobs):
            if isinstance(parsed, str):
                counts.images_unreadable_annotation += 1
                log.warning("leaving out %s: %s", jpg, parsed)
                continue
            width, height, boxes, labels, difficult = parsed
            record = ImageRecord(
                jpg, len(records), width, height,
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64),
                torch.tensor(difficult, dtype=torch.bool),
                torch.zeros(len(labels), dtype=torch.bool),
                source,
            )
            records.append(clean_record(record, counts, drop_flagged=not keep_difficult, flag="difficult"))
    names = ", ".join(dict.fromkeys(source for _, source, _ in jobs))
    kept = finish_records(records, counts, skip_empty, f"{field}: {root} ({names})")
    return FileDetections(fs, kept, classes, counts, transform)


def voc_split_ids(root: str, sets: Sequence[str | Sequence[str]], field: str = "data.root"
                  ) -> list[tuple[str, str, list[str]]]:
    """(year, split, image ids) of each set, read from the split files alone (no annotation is read)."""
    fs, base = resolve(root, field)
    return [(year, split, _split_ids(fs, _year_folder(fs, base, root, year, field), year, split, field))
            for year, split in parse_sets(sets, field)]


def check_voc_sets(root: str, sets: Sequence[str | Sequence[str]], field: str = "data.root") -> None:
    """Fail fast (on a job's driver) when a year folder or split file of `sets` is missing or a split is
    empty: the same errors `voc_detection` raises, without reading any annotation."""
    voc_split_ids(root, sets, field)
