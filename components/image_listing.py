"""Listing a split's input files and what is known about each image before it is read.

An image's label comes from its folder name (`train/3/x.png` is class 3) or, when a labels
file is named, from the nearest such CSV (columns `file`, `label`; `file` relative to the
CSV's folder) in the image's folder or a folder above it, up to the input base. Its variant
and distortion come the same way from the nearest `manifest.csv` (the data contract's
manifest), or are `unknown` and `{}`.
"""

import csv
import dataclasses
import io
import os
import posixpath
import re
import stat

from tfx.dsl.io import fileio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz")
MANIFEST = "manifest.csv"
UNKNOWN_VARIANT = "unknown"
NO_DISTORTION = "{}"
_CLASS_FOLDER = re.compile(r"[0-9]+")
MAX_INT64 = 2**63 - 1  # the largest label a tf.Example holds, and span ML Metadata records
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """One image file: its label, variant and distortion JSON, or the problem found already."""

    path: str
    label: int | None
    variant: str = UNKNOWN_VARIANT
    distortion: str = NO_DISTORTION
    problem: str | None = None


def list_split(input_base, split_pattern, labels_file=None):
    """(image sources, TFRecord paths) for the files `split_pattern` matches under `input_base`.

    Manifests and labels files are metadata and skipped; other files that are neither images
    nor TFRecords come back as image sources with a problem.
    Raises ValueError when the pattern matches no file.
    """
    pattern = os.path.join(input_base, split_pattern)
    paths = sorted(fileio.glob(pattern))
    if not paths:
        raise ValueError(f"input pattern {pattern!r} matches no files: the split is empty")
    tables = _CsvTables(input_base)
    images, tfrecords = [], []
    metadata_files = {MANIFEST, labels_file}
    for path in paths:
        lower = path.lower()
        if os.path.basename(path) in metadata_files:
            continue
        if lower.endswith(TFRECORD_SUFFIXES):
            tfrecords.append(path)
        elif lower.endswith(IMAGE_SUFFIXES):
            images.append(_image_source(path, tables, labels_file))
        else:
            images.append(
                ImageSource(
                    path, None, problem="is neither an image (.png, .jpg) nor a TFRecord file"
                )
            )
    return images, tfrecords


def _image_source(path, tables, labels_file):
    manifest_row = tables.row(path, MANIFEST, ("file", "variant", "params"))
    variant = manifest_row["variant"] if manifest_row else UNKNOWN_VARIANT
    distortion = manifest_row["params"] if manifest_row else NO_DISTORTION
    if labels_file:
        row = tables.row(path, labels_file, ("file", "label"))
        if row is None:
            return ImageSource(path, None, problem=f"is not listed in any {labels_file}")
        label_text, origin = row["label"], f"its {labels_file} label"
    else:
        label_text, origin = os.path.basename(os.path.dirname(path)), "its folder name"
    if not _CLASS_FOLDER.fullmatch(label_text):
        problem = f"{origin} {label_text!r} is not a class index (a non-negative integer)"
        return ImageSource(path, None, variant, distortion, problem)
    if int(label_text) > MAX_INT64:
        problem = f"{origin} {label_text!r} is above 2**63-1, the largest int64 label"
        return ImageSource(path, None, variant, distortion, problem)
    return ImageSource(path, int(label_text), variant, distortion)


class _CsvTables:
    """The nearest CSV of a given name above a file, read once per folder."""

    def __init__(self, input_base):
        self._root = input_base
        self._tables = {}

    def row(self, path, name, columns):
        """The row for `path` in the nearest `name` above it (dict), or None."""
        relative = relative_path(path, self._root)
        for folder in _folders_above(relative):
            table = self._table(folder, name, columns)
            if table is not None:
                return table.get(relative)
        return None

    def _table(self, folder, name, columns):
        key = (folder, name)
        if key not in self._tables:
            csv_path = os.path.join(self._root, folder, name)
            exists = fileio.exists(csv_path)
            self._tables[key] = _read_table(csv_path, folder, columns) if exists else None
        return self._tables[key]


def metadata_paths(input_base, paths, labels_file=None):
    """The manifests and labels files that give `paths` (under `input_base`) their details."""
    names = [MANIFEST, *([labels_file] if labels_file else [])]
    folders = {
        folder for path in paths for folder in _folders_above(relative_path(path, input_base))
    }
    candidates = (os.path.join(input_base, folder, name) for folder in folders for name in names)
    return sorted(path for path in candidates if fileio.exists(path))


def relative_path(path, input_base):
    """`path` relative to `input_base` (normalized, '/'-separated), or None if not below it.

    Either may be a URI (`gs://bucket/data`); only the part after the scheme is normalized.
    """
    scheme, rest = _split_uri(path)
    base_scheme, base_rest = _split_uri(input_base)
    if scheme != base_scheme:
        return None
    if scheme:  # rooted, so relpath never consults the working directory
        relative = posixpath.relpath(posixpath.join("/", rest), posixpath.join("/", base_rest))
    else:
        relative = os.path.relpath(path, input_base)
    return None if relative == os.pardir or relative.startswith(os.pardir + "/") else relative


def _split_uri(path):
    """('gs://', 'bucket/x') for 'gs://bucket/x'; ('', path) for a local path."""
    match = _URI.match(path)
    return (match[1], match[2]) if match else ("", path)


def _folders_above(relative):
    """The folders of relative path `relative` from its own up to the input base ('')."""
    if relative is None:
        return
    folder = posixpath.dirname(relative)
    while folder:
        yield folder
        folder = posixpath.dirname(folder)
    yield ""


def special_file_reason(path):
    """Why local `path` is not read if it is a FIFO, a device or a socket (or links to one),
    else None: reading one could block forever or never end."""
    if "://" in path:
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a broken link: the read says what is wrong
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "not a regular file: a FIFO, a device or a socket"


def _read_table(csv_path, folder, columns):
    """{file path relative to the input base: row} of the CSV at `csv_path` in `folder`.

    Its rows must fill `columns`; raises ValueError naming the CSV and the line.
    """
    reason = special_file_reason(csv_path)
    if reason is not None:
        raise ValueError(f"{csv_path}: cannot be read ({reason})")
    with fileio.open(csv_path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode()
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{csv_path}, line {line}: byte {error.start} ({data[error.start : error.end]!r}) is "
            "not UTF-8; save the file as UTF-8"
        ) from error
    # Excel's "CSV UTF-8" starts with a byte order mark, which would join the first column name.
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    missing = [column for column in columns if column not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; it has {reader.fieldnames}")
    table = {}
    for row in reader:
        for column in columns:
            if not row[column]:  # None: the row is too short; '': the field is empty
                raise ValueError(f"{csv_path}, line {reader.line_num}: no {column!r} value")
        table[posixpath.normpath(posixpath.join(folder, row["file"]))] = row
    return table
