"""`stn-pipeline data` and pipeline.spans: layout, manifest, determinism, --force, errors."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import cli, distorted_mnist, spans


@pytest.fixture(scope="module")
def span_from_cli(tmp_path_factory):
    """A span written by the CLI: mixed variants, 50 train and 50 eval digits per class, one
    copy each, 30 x 30 canvas."""
    root = tmp_path_factory.mktemp("data")
    argv = ["data", "--out", str(root), "--variant", "mixed", "--copies", "1", "--canvas", "30"]
    assert cli.main([*argv, "--per-class", "50"]) == 0
    return root / "span-1"


def png_files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*.png"))


def test_layout_and_manifest_agree_with_the_files(span_from_cli):
    with open(span_from_cli / "manifest.csv", newline="") as handle:
        raw = list(csv.reader(handle))
    assert tuple(raw[0]) == ("file", "split", "label", "source_index", "variant", "params")
    rows = spans.read_manifest(span_from_cli)
    assert sorted(r["file"] for r in rows) == png_files(span_from_cli)
    assert [r["split"] for r in rows].count("train") == 500
    assert [r["split"] for r in rows].count("eval") == 500
    _, labels = distorted_mnist.load_source()
    for row in rows:
        split, label, name = row["file"].split("/")
        assert (split, int(label)) == (row["split"], row["label"])
        assert name.endswith(".png") and len(name) == len("000042.png")
        assert labels[row["source_index"]] == row["label"]
    assert {r["variant"] for r in rows} == set(distorted_mnist.VARIANTS)
    train = {r["source_index"] for r in rows if r["split"] == "train"}
    eval_ = {r["source_index"] for r in rows if r["split"] == "eval"}
    assert len(train) == 500 and len(eval_) == 500 and not train & eval_


def test_pngs_are_grayscale_and_redrawn_by_their_manifest_row(span_from_cli):
    digits, _ = distorted_mnist.load_source()
    rows = spans.read_manifest(span_from_cli)[::7]
    for row in rows:
        with Image.open(span_from_cli / row["file"]) as picture:
            assert (picture.format, picture.mode, picture.size) == ("PNG", "L", (30, 30))
            pixels = np.asarray(picture)
        redrawn = distorted_mnist.render(
            row["variant"], digits[[row["source_index"]]], [row["params"]], 30
        )
        assert np.array_equal(pixels, redrawn[0])


def test_same_seed_gives_identical_bytes_and_the_span_number_is_the_default_seed(tmp_path):
    small = {"variant": "mixed", "copies": 2, "per_class": 10}
    first = spans.write_span(tmp_path / "a", span=2, seed=2, **small)
    again = spans.write_span(tmp_path / "b", span=2, **small)  # seed = span
    other = spans.write_span(tmp_path / "a", span=3, **small)
    names = png_files(first)
    assert names == png_files(again)
    for name in [*names, "manifest.csv"]:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert (first / "manifest.csv").read_bytes() != (other / "manifest.csv").read_bytes()
    shared = [n for n in names if (other / n).exists()]  # same index, same label folder
    assert len(shared) < 0.5 * len(names)
    differing = sum((first / n).read_bytes() != (other / n).read_bytes() for n in shared)
    assert differing > 0.9 * len(shared)


def test_existing_span_is_an_error_unless_force_replaces_it(tmp_path, capsys):
    folder = spans.write_span(tmp_path, span=1, copies=1, per_class=5)
    (folder / "stale.txt").write_text("left from an older span")
    before = (folder / "manifest.csv").read_bytes()
    with pytest.raises(FileExistsError, match="span-1"):
        spans.write_span(tmp_path, span=1, copies=1, per_class=5, seed=5)
    argv = ["data", "--out", str(tmp_path), "--copies", "1", "--per-class", "5", "--seed", "5"]
    assert cli.main(argv) == 1
    assert "span-1 already exists" in capsys.readouterr().err
    assert (folder / "manifest.csv").read_bytes() == before
    assert cli.main([*argv, "--force"]) == 0
    assert not (folder / "stale.txt").exists()
    assert (folder / "manifest.csv").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["span-1"]  # no partial folder left


def test_cli_prints_the_folder_and_reports_progress_on_stderr(tmp_path, capsys):
    argv = ["data", "--out", str(tmp_path), "--span", "4", "--copies", "3", "--per-class", "7"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "span-4")
    assert "wrote 420/420 images" in err and "images/s" in err
    assert "seed 4" in err
    rows = spans.read_manifest(tmp_path / "span-4")
    for split in ("train", "eval"):
        labels = [r["label"] for r in rows if r["split"] == split]
        assert np.bincount(labels).tolist() == [7 * 3] * 10


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--copies", "0", "copies must be an integer >= 1, got 0"),
        ("--canvas", "27", "canvas must be at least 28 pixels, got 27"),
        ("--seed", "-3", "seed must be an integer >= 0, got -3"),
        ("--span", "0", "span must be an integer >= 1, got 0"),
        (
            "--span",
            "9223372036854775808",
            "span must be at most 2**63-1 (ML Metadata's int64), got 9223372036854775808",
        ),
        ("--per-class", "0", "per_class must be None or an integer >= 1, got 0"),
    ],
)
def test_cli_rejects_bad_numbers(tmp_path, capsys, option, value, message):
    assert cli.main(["data", "--out", str(tmp_path), option, value]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_uri_data_root(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "--out", "gs://bucket/data"])
    assert exit_info.value.code == 2
    assert "argument --out: gs://bucket/data is a URI" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no local folder named gs:


def test_cli_refuses_an_empty_data_root(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "--out", "", "--per-class", "1", "--copies", "1"])
    assert exit_info.value.code == 2
    assert "argument --out: must name a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no span-1 in the current folder


def test_cli_rejects_an_unknown_variant(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "--out", str(tmp_path), "--variant", "spiral"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'spiral'" in capsys.readouterr().err


def test_read_manifest_names_the_file_and_line_of_bad_rows(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "file,split,label,source_index,variant,params\n"
        'train/1/000000.png,train,1,7,r,"{""angle_deg"": 3}"\n'
        "train/2/000001.png,train,two,8,r,{}\n"
    )
    with pytest.raises(ValueError, match=r"manifest.csv, line 3"):
        spans.read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("file,label\ntrain/1/000000.png,1\n")
    with pytest.raises(ValueError, match="columns must be"):
        spans.read_manifest(tmp_path)


def test_a_span_that_appears_while_one_is_written_is_kept_without_force(tmp_path, monkeypatch):
    write_files = spans._write_files

    def another_writer_finishes_first(folder, *args):
        write_files(folder, *args)
        (tmp_path / "span-1").mkdir()
        (tmp_path / "span-1" / "theirs.png").write_bytes(b"their span")

    monkeypatch.setattr(spans, "_write_files", another_writer_finishes_first)
    with pytest.raises(FileExistsError, match="span-1 already exists"):
        spans.write_span(tmp_path, span=1, copies=1, per_class=2)
    assert (tmp_path / "span-1" / "theirs.png").read_bytes() == b"their span"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["span-1"]


def whole(span_folder):
    """Whether the span's files are exactly those its manifest lists."""
    rows = spans.read_manifest(span_folder)
    return sorted(r["file"] for r in rows) == png_files(span_folder)


def test_force_replaces_a_span_whole_even_when_stopped_while_deleting(tmp_path, monkeypatch):
    folder = spans.write_span(tmp_path, span=1, copies=1, per_class=2)
    rmtree = shutil.rmtree

    def stopped_halfway(path, *args, **kwargs):  # Ctrl-C while the old files are deleted
        rmtree(Path(path) / "eval")
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        spans.write_span(tmp_path, span=1, copies=2, per_class=2, force=True)
    monkeypatch.undo()
    assert whole(folder) and len(spans.read_manifest(folder)) == 80  # the new span
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("span-") and p != folder]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_force_replaces_a_file_or_link_in_the_way(tmp_path, kind):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.txt").write_text("not the span's to delete")
    root = tmp_path / "data"
    root.mkdir()
    if kind == "file":
        (root / "span-1").write_text("in the way")
    else:
        (root / "span-1").symlink_to(elsewhere)
    folder = spans.write_span(root, span=1, copies=1, per_class=2, force=True)
    assert folder.is_dir() and not folder.is_symlink() and whole(folder)
    assert sorted(p.name for p in root.iterdir()) == ["span-1"]
    assert (elsewhere / "kept.txt").exists()
