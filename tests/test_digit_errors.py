"""benchmarks/digit_errors.py: errors over source digits and paired comparisons, by hand."""

import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.distorted_mnist import make_split

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import digit_errors  # noqa: E402  (lives in benchmarks/, put on the path just above)


def test_standard_error_counts_source_digits_not_copies():
    # two digits x two copies: one digit always wrong, one always right -> rates 1 and 0,
    # standard deviation 0.7071, over sqrt(2) digits: 0.5 (the binomial one of 4 images: 0.25)
    error, se = digit_errors.error_over_digits([1, 0, 1, 0], [7, 3, 7, 3])
    assert error == 50 and se == pytest.approx(50)
    # one image each: the per-digit rates are the images, so the spread is theirs
    wrong = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    error, se = digit_errors.error_over_digits(wrong, np.arange(10))
    assert error == pytest.approx(20) and se == pytest.approx(100 * wrong.std(ddof=1) / np.sqrt(10))
    # copies that disagree spread less than digits that do: rates 0.5 and 0.5 -> 0
    assert digit_errors.error_over_digits([1, 0, 0, 1], [1, 1, 2, 2]) == (50, 0)


def test_paired_difference_pairs_digits_whatever_the_image_order():
    # A: digit 1 wrong in both copies, digit 2 right; B: digit 1 wrong in one copy of two.
    # Per-digit differences B - A: -0.5 and 0 -> mean -0.25, std 0.3536, / sqrt(2) = 0.25
    wrong_a, sources_a = [1, 1, 0, 0], [1, 1, 2, 2]
    expected = (-25, 25)
    assert digit_errors.paired_difference(wrong_a, sources_a, [0, 1, 0, 0], [1, 1, 2, 2]) == (
        pytest.approx(expected)
    )
    shuffled = digit_errors.paired_difference(wrong_a, sources_a, [0, 0, 0, 1], [2, 1, 2, 1])
    assert shuffled == pytest.approx(expected)
    # the same errors on both sides: no difference, and no spread
    assert digit_errors.paired_difference(wrong_a, sources_a, wrong_a, sources_a) == (0, 0)
    with pytest.raises(ValueError, match="different source digits"):
        digit_errors.paired_difference(wrong_a, sources_a, [0, 0], [1, 3])


def test_digits_misread_counts_digits_not_images():
    # A misreads digits 1 (twice) and 2; B misreads 2 and 3; nobody misreads 4
    sources = [1, 1, 2, 2, 3, 3, 4, 4]
    wrong_a = [1, 1, 0, 1, 0, 0, 0, 0]
    wrong_b = [0, 0, 1, 0, 1, 0, 0, 0]
    assert digit_errors.digits_misread(wrong_a, sources, wrong_b, sources) == (1, 1, 1)


def test_errors_by_angle_bins_the_absolute_angle():
    degrees = [-10, 14.9, 15, 44, -45, 90, 170, -180]
    wrong = [1, 0, 1, 0, 1, 1, 0, 1]
    assert digit_errors.errors_by_angle(wrong, degrees, (0, 15, 45, 90, 180)) == [
        (0, 15, 2, 1),
        (15, 45, 2, 1),
        (45, 90, 1, 1),
        (90, 180, 3, 2),  # 180 itself falls in the last bin
    ]


def test_predictions_round_trip_with_real_records(tmp_path):
    _, labels, records = make_split("r", 2, seed=3, split="eval", per_class=2)
    predicted = (labels + 1) % 10
    residual = np.linspace(0, 90, len(labels))
    path = tmp_path / "predictions_r_st_cnn_affine.npz"
    digit_errors.save_predictions(path, predicted, labels, records, residual)
    saved = digit_errors.load_predictions(str(path))
    assert sorted(saved) == ["angle_deg", "label", "predicted", "residual_deg", "source_index"]
    assert np.array_equal(saved["predicted"], predicted)
    assert np.array_equal(saved["label"], labels)
    assert list(saved["source_index"]) == [r["source_index"] for r in records]
    angles = [r["params"]["angle_deg"] for r in records]
    assert saved["angle_deg"] == pytest.approx(angles, abs=1e-4)
    assert saved["residual_deg"] == pytest.approx(residual, abs=1e-4)


def test_load_predictions_names_the_file_and_what_is_wrong(tmp_path):
    with pytest.raises(SystemExit, match=r"nowhere\.npz: no such predictions file"):
        digit_errors.load_predictions(str(tmp_path / "nowhere.npz"))
    other = tmp_path / "other.npz"
    np.savez(other, predicted=np.zeros(3))
    with pytest.raises(SystemExit, match=r"other\.npz: not a predictions file, missing label"):
        digit_errors.load_predictions(str(other))
    text = tmp_path / "notes.npz"
    text.write_text("not numpy")
    with pytest.raises(SystemExit, match=r"notes\.npz: not a predictions file \("):
        digit_errors.load_predictions(str(text))


def test_pooled_runs_share_source_digits():
    one = {"predicted": np.array([1, 2]), "source_index": np.array([5, 6]), "angle_deg": [0, 1]}
    two = {"predicted": np.array([3, 4]), "source_index": np.array([5, 6])}
    merged = digit_errors.pooled([one, two])
    assert sorted(merged) == ["predicted", "run", "source_index"]  # what both runs have, + run
    assert list(merged["predicted"]) == [1, 2, 3, 4]
    assert list(merged["source_index"]) == [5, 6, 5, 6]  # digit 5 of run 2 is digit 5 of run 1
    assert list(merged["run"]) == [0, 0, 1, 1]
    assert len(set(digit_errors.digit_draws(merged))) == 4


def test_files_whose_digits_disagree_on_labels_are_refused():
    same = {"source_index": np.array([5, 6, 5]), "label": np.array([1, 2, 1])}
    other = {"source_index": np.array([6, 7]), "label": np.array([2, 9])}
    digit_errors.check_shared_digits([same, other], ["a.npz", "b.npz"])  # digit 6: 2 in both
    relabelled = {"source_index": np.array([5, 7]), "label": np.array([4, 9])}
    with pytest.raises(ValueError, match=r"source digit 5 has different labels in a\.npz, c\.npz"):
        digit_errors.check_shared_digits([same, other, relabelled], ["a.npz", "b.npz", "c.npz"])


def write(path, predicted, labels, sources, **extra):
    np.savez(path, predicted=predicted, label=labels, source_index=sources, **extra)
    return str(path)


def test_command_line_pairs_two_seeds(tmp_path):
    labels, sources = [3, 3, 5, 5], [10, 10, 20, 20]
    angles = [5.0, -60.0, 30.0, 80.0]
    files = [  # seed 1: A misses 2 images, B 1; seed 2: A misses 2, B none
        write(tmp_path / "a1.npz", [3, 0, 5, 0], labels, sources, angle_deg=angles),
        write(tmp_path / "b1.npz", [3, 3, 5, 0], labels, sources, residual_deg=[1, 2, 3, 50]),
        write(tmp_path / "a2.npz", [0, 0, 5, 5], labels, sources, angle_deg=angles),
        write(tmp_path / "b2.npz", [3, 3, 5, 5], labels, sources, residual_deg=[1, 2, 3, 4]),
    ]
    done = subprocess.run(
        [
            *(sys.executable, "benchmarks/digit_errors.py", *files),
            *("--names", "cnn", "st", "--plots", str(tmp_path / "plots")),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # Both seeds read digits 10 and 20, so the unit is the source digit, over both seeds' copies:
    # cnn misses 3 of digit 10's 4 copies and 1 of digit 20's: rates 0.75, 0.25, so 4 of 8
    # images, 50%, ± std(0.75, 0.25) / sqrt(2) = 0.3536 / 1.4142 = 25%. st: rates 0, 0.25 ->
    # 12.5% ± 0.1768 / 1.4142 = 12.5%. st - cnn per digit: -0.75, 0 -> -37.5 ± 37.5 % points.
    # (Taking each seed's digit as its own unit, 4 units, gives ± 20.41, 12.50 and 23.94.)
    assert re.search(r"\n\s*cnn\s+50\.00 ± 25\.00\s+4\s+8\n", out)
    assert re.search(r"\n\s*st\s+12\.50 ± 12\.50\s+1\s+8\n", out)
    assert (
        "st - cnn: -37.50 ± 37.50 % points, paired over 2 source digits (4 digit draws in 2 "
        "runs; st makes 75.0% fewer errors)"
    ) in out
    swapped = subprocess.run(
        [
            sys.executable,
            "benchmarks/digit_errors.py",
            *(files[i] for i in (1, 0, 3, 2)),
            "--names",
            "st",
            "cnn",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "cnn makes 300.0% more errors" in swapped.stdout  # 4 errors where st makes 1
    # digit draws misread: cnn (seed 1, 10), (1, 20), (2, 10); st (1, 20)
    assert "digit draws misread in at least one copy: both 1, cnn only 2, st only 0" in out
    # by true angle (A's files have it): 0-15: image 0 twice, A wrong once
    assert "errors by how far the digit was turned" in out and "1 of 2 (50.0%)" in out
    # by residual (B's files have it): 45-90: one image, wrong
    assert "errors by how far the transformer left it from upright" in out
    assert "1 of 1 (100.0%)" in out
    for column in ("angle_deg", "residual_deg"):
        with Image.open(tmp_path / "plots" / f"errors_by_{column}.png") as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_angle_bins_without_images_get_no_bar(tmp_path, monkeypatch):
    from stn_model import visualize

    drawn = []
    monkeypatch.setattr(visualize, "plot_slice_metrics", lambda bins, *_, **__: drawn.append(bins))
    tables = {"A": [(0, 15, 4, 1), (15, 45, 0, 0)], "B": [(0, 15, 4, 2), (15, 45, 0, 0)]}
    digit_errors.plot_errors_by_angle(tables, ["0-15", "15-45"], "angle", tmp_path / "x.png")
    assert drawn == [{"0-15 degrees": {"A: error %": 25.0, "B: error %": 50.0}}]
    assert [digit_errors.angle_cell(angle_bin) for angle_bin in tables["A"]] == [
        "1 of 4 (25.0%)",
        "no images",
    ]


@pytest.mark.parametrize(
    "b, options, message",
    [
        (None, [], "give pairs of predictions files"),
        ({"labels": [1], "sources": [2]}, [], "read different source digits"),
        ({"labels": [4], "sources": [1]}, [], "source digit 1 has different labels in"),
        ({"labels": [1], "sources": [1]}, ["--names", "cnn", "cnn"], "two different names"),
    ],
)
def test_command_line_usage_errors(tmp_path, b, options, message):
    files = [write(tmp_path / "a.npz", [1], [1], [1])]
    if b:
        files.append(write(tmp_path / "b.npz", [1], b["labels"], b["sources"]))
    done = subprocess.run(
        [sys.executable, "benchmarks/digit_errors.py", *files, *options],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


STORED = sorted(glob.glob(f"{REPO_ROOT}/benchmarks/results/**/digit_errors.txt", recursive=True))


def stored_sections(path):
    """[(names, files, the tool's output)] of a stored digit_errors.txt: a section starts at its
    two "model: files" lines, ends before the next "###" title, and leaves out the "written:
    PNG" lines of --plots."""
    with open(path) as f:
        chunks = re.split(r"^###.*$", f.read(), flags=re.M)
    sections = []
    for chunk in filter(str.strip, chunks):
        lines = [line for line in chunk.strip().split("\n") if not line.startswith("written: ")]
        (a, files_a), (b, files_b) = (line.split(": ", 1) for line in lines[:2])
        pairs = zip(files_a.split(", "), files_b.split(", "), strict=True)
        sections.append(((a, b), [f for pair in pairs for f in pair], "\n".join(lines)))
    return sections


@pytest.mark.parametrize("path", STORED, ids=lambda path: os.path.relpath(path, REPO_ROOT))
def test_stored_outputs_are_what_the_tool_prints(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the stored files name the predictions from the repo root
    sections = stored_sections(path)
    assert sections, f"{path}: no sections"
    for names, files, stored in sections:
        assert digit_errors.main([*files, "--names", *names]) == 0
        assert capsys.readouterr().out.strip() == stored, f"{path}: {names} is stale"
