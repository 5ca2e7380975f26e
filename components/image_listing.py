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
import re

from tfx.dsl.io import fileio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz")
MANIFEST = "manifest.csv"
UNKNOWN_VARIANT = "unknown"
NO_DISTORTION = "{}"
_CLASS_FOLDER = re.compile(r"[0-9]+")


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
    return ImageSource(path, int(label_text), variant, distortion)


class _CsvTables:
    """The nearest CSV of a given name above a file, read once per folder."""

    def __init__(self, input_base):
        self._root = os.path.normpath(input_base)
        self._tables = {}

    def row(self, path, name, columns):
        """The row for `path` in the nearest `name` above it (dict), or None."""
        folder = os.path.dirname(os.path.normpath(path))
        while True:
            table = self._table(folder, name, columns)
            if table is not None:
                return table.get(os.path.normpath(path))
            if folder == self._root or not folder.startswith(self._root + os.sep):
                return None
            folder = os.path.dirname(folder)

    def _table(self, folder, name, columns):
        key = (folder, name)
        if key not in self._tables:
            csv_path = os.path.join(folder, name)
            self._tables[key] = _read_table(csv_path, columns) if fileio.exists(csv_path) else None
        return self._tables[key]


def _read_table(csv_path, columns):
    """{normalized file path: row} of the CSV at `csv_path`, whose rows must fill `columns`."""
    with fileio.open(csv_path, "r") as handle:
        reader = csv.DictReader(io.StringIO(handle.read()))
        missing = [column for column in columns if column not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; it has {reader.fieldnames}")
        folder = os.path.dirname(csv_path)
        table = {}
        for row in reader:
            for column in columns:
                if not row[column]:  # None: the row is too short; '': the field is empty
                    raise ValueError(f"{csv_path}, line {reader.line_num}: no {column!r} value")
            table[os.path.normpath(os.path.join(folder, row["file"]))] = row
        return table
