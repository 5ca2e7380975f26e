"""Test errors counted over source digits, and two models' errors compared digit by digit.

The eval split of bench_accuracy.py holds several distorted copies of each source digit. The
copies are not independent images, so the standard error of a test error is taken over the
digits, and two models are compared digit by digit: the difference of their error rates on
each digit, averaged, with its standard error over the digits. bench_accuracy.py saves each
model's eval predictions as `predictions_<distortion>_<model>.npz`; give this script pairs of
them (model A, then model B; one pair per seed, say):

    .venv/bin/python benchmarks/digit_errors.py \\
        RESULTS/predictions_r_cnn.npz RESULTS/predictions_r_st_cnn_affine.npz [A2 B2 ...]

Every run reads the same eval source digits (`source_index` indexes the 5,000 digits of
pipeline.distorted_mnist.load_source, whatever the seed; a seed only redraws the copies), and
a digit that is hard in one seed is hard in the others. So the runs are pooled by source
digit: a digit's rate is taken over its copies in all runs, and the standard errors are over
the source digits, not over the digit draws (a source digit in one run). Files whose source
digits carry different labels do not index the same digits, and are refused.

It prints both models' errors, B's minus A's with its standard error, how many digit draws
each misreads in at least one copy (and how many both do), the errors by how far each digit
was turned (where the distortion turns digits), and, for an ST model on R, by how far its
transformer left the digit from upright; `--plots DIR` draws those as bar charts in DIR. The
pairs may come from different draws of the same digits (upright and rotated, say): they are
paired by source digit, never by image.
"""

import argparse
import itertools
import os
import sys
import zipfile

import numpy as np
from _util import print_table

FIELDS = ("predicted", "label", "source_index")  # every predictions file has these
ANGLE_COLUMNS = {  # saved by bench_accuracy.py where they apply: what, bins in degrees
    "angle_deg": ("how far the digit was turned", (0, 15, 45, 90)),
    "residual_deg": ("how far the transformer left it from upright", (0, 15, 45, 90, 180)),
}


def error_over_digits(wrong, sources):
    """(% of the images `wrong`, its standard error %), where `sources` names each image's
    source digit. The copies of one digit are not independent images, so the standard error
    is that of the mean over the digits of their error rates (every digit has as many copies)."""
    _, rates = rates_per_digit(wrong, sources)
    spread = rates.std(ddof=1) / np.sqrt(len(rates))
    return 100 * float(np.mean(wrong)), 100 * float(spread)


def rates_per_digit(wrong, sources):
    """(the distinct digits of `sources`, sorted; each one's share of its images `wrong`)."""
    wrong = np.asarray(wrong, dtype=float)
    digits, digit = np.unique(sources, return_inverse=True)
    return digits, np.bincount(digit, weights=wrong) / np.bincount(digit)


def paired_difference(wrong_a, sources_a, wrong_b, sources_b):
    """(B's error % minus A's, its standard error in % points), from the difference of the two
    models' error rates on each source digit; both must have read the same digits."""
    digits_a, rates_a = rates_per_digit(wrong_a, sources_a)
    digits_b, rates_b = rates_per_digit(wrong_b, sources_b)
    if not np.array_equal(digits_a, digits_b):
        raise ValueError("the two models read different source digits; pair runs of one split")
    diff = rates_b - rates_a
    return 100 * float(diff.mean()), 100 * float(diff.std(ddof=1) / np.sqrt(len(diff)))


def digits_misread(wrong_a, sources_a, wrong_b, sources_b):
    """(both, A only, B only): how many of the digits that `sources_a` and `sources_b` name
    (source digits, or digit draws) the models get wrong in at least one of their copies."""
    digits_a, rates_a = rates_per_digit(wrong_a, sources_a)
    digits_b, rates_b = rates_per_digit(wrong_b, sources_b)
    a, b = set(digits_a[rates_a > 0]), set(digits_b[rates_b > 0])
    return len(a & b), len(a - b), len(b - a)


def errors_by_angle(wrong, degrees, bins):
    """[(low, high, images, errors)] of the images whose |degrees| lie in [low, high) (the
    last bin closed) for consecutive `bins` edges."""
    wrong, degrees = np.asarray(wrong, dtype=bool), np.abs(np.asarray(degrees, dtype=float))
    where = np.clip(np.digitize(degrees, bins) - 1, 0, len(bins) - 2)
    return [
        (bins[i], bins[i + 1], int(np.sum(where == i)), int(np.sum(wrong[where == i])))
        for i in range(len(bins) - 1)
    ]


def save_predictions(path, predicted, labels, records, residual_deg=None):
    """Writes a model's eval predictions (top class per image) beside each image's label,
    source digit and scalar distortion parameters (`records`, as make_split returns them) and,
    for an ST model on R, how far its transformer left each digit from upright."""
    params = records[0]["params"] if records else {}
    arrays = {
        "predicted": np.asarray(predicted, dtype=np.int8),
        "label": np.asarray(labels, dtype=np.int8),
        "source_index": np.array([r["source_index"] for r in records], dtype=np.int32),
        **{
            key: np.array([r["params"][key] for r in records], dtype=np.float32)
            for key, value in params.items()
            if np.isscalar(value)
        },
    }
    if residual_deg is not None:
        arrays["residual_deg"] = np.asarray(residual_deg, dtype=np.float32)
    np.savez_compressed(path, **arrays)


def load_predictions(path):
    """{name: array} of a predictions file; a clear error when it is not one."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such predictions file (bench_accuracy.py writes them)")
    try:
        with np.load(path) as data:
            arrays = dict(data)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise SystemExit(f"{path}: not a predictions file ({error})") from error
    missing = [name for name in FIELDS if name not in arrays]
    if missing:
        raise SystemExit(f"{path}: not a predictions file, missing {', '.join(missing)}")
    return arrays


def pooled(runs):
    """One run from several (one per seed, say): the arrays they all have, concatenated, and
    "run", each image's run number. Source digits keep their ids, so a digit's copies in all
    runs count as one digit (see the module's docstring)."""
    keys = set.intersection(*(set(run) for run in runs))
    merged = {key: np.concatenate([run[key] for run in runs]) for key in keys}
    merged["run"] = np.concatenate(
        [np.full(len(run["source_index"]), i, dtype=np.int64) for i, run in enumerate(runs)]
    )
    return merged


def check_shared_digits(runs, paths):
    """ValueError, naming the files, unless each source digit id has one label in all `runs`
    (read from `paths`): otherwise the ids do not name the same digits in every file."""
    sources = np.concatenate([run["source_index"] for run in runs])
    labels = np.concatenate([run["label"] for run in runs])
    pairs = np.unique(np.stack([sources, labels]), axis=1)  # each (digit, label) once
    ids, labels_per_id = np.unique(pairs[0], return_counts=True)
    if np.any(labels_per_id > 1):
        digit = ids[labels_per_id > 1][0]
        named = [
            path for path, run in zip(paths, runs, strict=True) if digit in run["source_index"]
        ]
        raise ValueError(
            f"source digit {digit} has different labels in {', '.join(named)}: these files do "
            "not index the same source digits"
        )


def digit_draws(run):
    """Each image's digit draw (its source digit in its run) as one integer."""
    return run.get("run", 0) * 2**32 + run["source_index"].astype(np.int64)


def compare(a, b, names=("A", "B"), plots=None, out=None):
    """Prints the comparison of runs `a` and `b` (see the module's docstring) to `out` (None:
    the sys.stdout of the moment) and, with `plots` (a folder), draws the errors by angle as
    PNG bar charts there."""
    runs = dict(zip(names, (a, b), strict=True))
    wrong = {name: run["predicted"] != run["label"] for name, run in runs.items()}
    rows = []
    for name, run in runs.items():
        error, se = error_over_digits(wrong[name], run["source_index"])
        rows.append((name, f"{error:.2f} ± {se:.2f}", int(wrong[name].sum()), len(wrong[name])))
    print_table(["model", "error % (± over source digits)", "errors", "images"], rows, file=out)
    by_digit = [x for name, run in runs.items() for x in (wrong[name], run["source_index"])]
    by_draw = [x for name, run in runs.items() for x in (wrong[name], digit_draws(run))]
    diff, se = paired_difference(*by_digit)
    both, a_only, b_only = digits_misread(*by_draw)
    errors_a, errors_b = (int(w.sum()) for w in wrong.values())
    change = f"{abs(errors_b - errors_a) / errors_a:.1%}" if errors_a else "n/a"
    fewer = "fewer" if errors_b <= errors_a else "more"
    digits, draws = len(np.unique(a["source_index"])), len(np.unique(digit_draws(a)))
    runs_read = len(np.unique(a.get("run", 0)))
    print(
        f"\n{names[1]} - {names[0]}: {diff:+.2f} ± {se:.2f} % points, paired over {digits:,} "
        f"source digits ({draws:,} digit draws in {runs_read} run{'s' * (runs_read > 1)}; "
        f"{names[1]} makes {change} {fewer} errors)\n"
        f"digit draws misread in at least one copy: both {both}, {names[0]} only {a_only}, "
        f"{names[1]} only {b_only}",
        file=out,
    )
    for column, (what, bins) in ANGLE_COLUMNS.items():
        tables = {
            name: errors_by_angle(wrong[name], run[column], bins)
            for name, run in runs.items()
            if column in run
        }
        if not tables:
            continue
        labels = [f"{low:g}-{high:g}" for low, high in itertools.pairwise(bins)]
        rows = [
            [label] + [angle_cell(t[i]) for t in tables.values()] for i, label in enumerate(labels)
        ]
        print(f"\nerrors by {what}, in degrees:", file=out)
        print_table(["degrees", *tables], rows, file=out)
        if plots:
            path = os.path.join(plots, f"errors_by_{column}.png")
            plot_errors_by_angle(tables, labels, what, path)


def angle_cell(angle_bin):
    """'errors of images (error %)' of one bin of `errors_by_angle`; no % for an empty bin."""
    _, _, images, errors = angle_bin
    return f"{errors} of {images} ({percent(angle_bin):.1f}%)" if images else "no images"


def percent(angle_bin):
    """The error % of one (low, high, images, errors) bin of `errors_by_angle` (0 if empty)."""
    _, _, images, errors = angle_bin
    return 100 * errors / max(images, 1)


def plot_errors_by_angle(tables, labels, what, path):
    """A PNG bar chart of each model's error % per angle bin (labelled `labels`) of `tables`
    (see `compare`); a bin without images has no bar (no error rate, not 0%)."""
    from stn_model.visualize import plot_slice_metrics

    by_bin = {
        f"{label} degrees": {
            f"{name}: error %": percent(t[i]) for name, t in tables.items() if t[i][2]
        }
        for i, label in enumerate(labels)
    }
    by_bin = {label: bars for label, bars in by_bin.items() if bars}
    plot_slice_metrics(by_bin, path, title=f"Errors by {what}", share_y=True)
    print(f"written: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="predictions files: A B [A2 B2 ...]")
    parser.add_argument("--names", nargs=2, default=("A", "B"), help="names of models A and B")
    parser.add_argument("--plots", metavar="DIR", help="draw the errors by angle as PNGs here")
    args = parser.parse_args(argv)
    if len(args.files) % 2:
        parser.error(f"give pairs of predictions files (A B ...), got {len(args.files)} files")
    if args.names[0] == args.names[1]:
        parser.error(f"--names needs two different names, got {' '.join(args.names)}")
    runs = [load_predictions(path) for path in args.files]
    for name, files in zip(args.names, (args.files[0::2], args.files[1::2]), strict=True):
        print(f"{name}: {', '.join(files)}")
    try:
        check_shared_digits(runs, args.files)
        compare(pooled(runs[0::2]), pooled(runs[1::2]), names=tuple(args.names), plots=args.plots)
    except ValueError as error:  # runs of different digits
        parser.error(f"{' '.join(args.files)}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
