"""Test error of the paper's models on distorted MNIST, beside the paper's Table 1.

Trains each model (CNN, ST-CNN affine / projective / TPS, FCN, ST-FCN; `--models` adds the
similarity ST-CNN, whose transformer only turns, scales and shifts) on each distortion
(R, RTS, P, E) of the embedded data (pipeline/distorted_mnist.py: 4,500 train digits x
`--copies` distorted copies; the paper had 60,000 digits), with one training recipe for all:
Adam, learning rate `--learning-rate` with cosine decay to 0 over `--epochs` epochs, batch
`--batch-size`, the same seed (so the same data order). With `--redraw` the training digits
are distorted anew every epoch (epoch e draws with seed `seed * 1000 + e`; every model of a
distortion sees the same draws), so the models cannot learn the training images by heart;
`--rotation-warmup N` then widens R's rotations over the first N epochs (epoch e < N turns
digits by at most 90 * (e + 1) / (N + 1) degrees), so that the transformer first learns to
turn small angles back, where the classification loss tells it which way to turn.
`--max-rotation DEG` narrows R's rotations (training and eval) to +-DEG degrees; with 0 the
models train and test on upright digits. `--canvas N` draws the digits on an N x N canvas
(default 42); with `--canvas 28 --max-rotation 0` the CNN reads the 28 x 28 source digits
themselves, at the size an ST-CNN's transformer writes for its classifier. `--zoom Z` (R only)
magnifies the digits Z times about their centre, as a transformer that zooms in would.
`--full-resolution-localization` lets the ST-CNNs' localization nets see the input at full
resolution (without their first 2x2 pool); `--localization-hidden-units N` ends them with a
fully connected layer of N units; `--st-iterations N` lets every transformer but TPS
correct its transform N - 1 times (Lin & Lucey 2017); `--tps-iterations N` gives the TPS
transformer N - 1 passes that find an affine transform before the one that finds the spline;
`--st-output-size N` makes the ST models' transformers write N x N images (default 28).
`--label-smoothing S` trains every model against labels smoothed by S. `--elastic-alpha A`
(with `--redraw`) bends the training digits elastically before distorting them, anew every
epoch: Simard et al. 2003's warp with sigma 4 px and strength A (34 in their paper and in E).
`--equivariance-weight W` adds W times a rotation equivariance loss to the ST models'
training (stn_model/equivariance.py: each training image is turned again by up to
+-`--equivariance-angle` degrees, and the transform found for it should be the turn composed
with the transform found for the image as it is); it needs no labels, and the CNN has nothing
it could apply to.
It reports the test error on the eval split (the 500 held-out digits x `--copies`, never
seen in training) beside Table 1 of Jaderberg et al. 2015 (arXiv 1506.02025), with training
time and peak RSS, and writes `accuracy.md`, `accuracy.json` and pictures per distortion
(inputs beside what the trained ST-CNN made of them, its sampling grids, training curves)
into `--out`, with each model's eval predictions (`predictions_<distortion>_<model>.npz`,
which benchmarks/digit_errors.py compares digit by digit). On R it also measures whether
each ST-CNN turns the digits back upright: the share of eval digits its sampling grids leave
within 15 degrees of upright (of the first 2,000), and the slope of grid rotation against
true angle.

    .venv/bin/python benchmarks/bench_accuracy.py --jobs 2            # everything (long, below)
    .venv/bin/python benchmarks/bench_accuracy.py --small             # smoke test, in /tmp
    .venv/bin/python benchmarks/bench_accuracy.py --variants rts --models cnn st_cnn_affine
    .venv/bin/python benchmarks/bench_accuracy.py --redraw --epochs 15 --rotation-warmup 6 \
        --models cnn st_cnn_affine st_cnn_tps --jobs 2               # the longer recipe

How long it takes on 2 CPU cores. The full run with `--jobs 2` (two distortions at a time, one
thread each) took 64 minutes on this project's 2-core machine: 5,100 CPU seconds of fitting with
the pure-TF sampler (the native one makes the ST models' steps cheaper). Fit CPU seconds per
distortion: CNN 350-410, each ST-CNN 230-350, FCN 11-13, ST-FCN 25-26. Peak RSS 3 GiB per
process. `--small` takes under a minute. With `--redraw` (native sampler) the CNN's fit costs
22 to 29 CPU seconds per epoch with two processes on the 2 cores (15 epochs: 334-436, in
benchmarks/results/three_options_r and equivariance_r), and 75 when five processes shared them
(benchmarks/results/redraw: CNN 1,110-1,140, each one-pass ST-CNN 690-920); drawing an epoch's
distortions takes 4 to 9 CPU seconds (R and RTS about 5, E the most). The longer recipe above
fits for 10,700 CPU seconds in all, about 1.5 hours with `--jobs 2` on an idle 2-core machine.
`--full-resolution-localization` doubles an ST-CNN's cost (15 epochs, sharing the cores:
1,860-2,010 CPU seconds); `--st-iterations 2` makes it about 1.5 times (1,230-1,370 CPU
seconds). Both with `--localization-hidden-units 50`: 980-1,170 CPU seconds per ST-CNN against
the CNN's 400-450, one thread per process and two processes on the 2 cores (3,070 when R shared
them with three other runs: oversubscribed cores inflate CPU seconds, so compare runs made the
same way). All three options and `--st-output-size 42`: 1,540 to 1,700 per ST-CNN, measured the
same way; the CNN with `--canvas 28`: 130 to 150, and with `--zoom` too, 190 to 235 (two such
runs at a time). `--elastic-alpha` makes drawing an R epoch cost 13 CPU seconds instead of 5
(counted in the first model's fit). The TPS ST-CNN with `--tps-iterations 3` and both
localization options: 1,310 to 1,445 CPU seconds; the similarity ST-CNN costs what the affine
one does.
"""

import argparse
import collections
import concurrent.futures
import functools
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
from _util import peak_rss_mib, print_table
from digit_errors import error_over_digits, save_predictions

import stn_model  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
from pipeline.distorted_mnist import R_MAX_ANGLE, SOURCE_SIZE, load_source, make_split, render
from stn_model.models import CNN_MIN_SIZE, MODEL_NAMES

# isort: split
import tf_keras as keras

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
VARIANTS = ("r", "rts", "p", "e")
TABLE_MODELS = tuple(m for m in MODEL_NAMES if m != "st_cnn_similarity")  # the full run's six
MODELS = (*TABLE_MODELS, "st_cnn_similarity")
ST_CNN_MODELS = tuple(m for m in MODELS if m.startswith("st_cnn"))
# Jaderberg et al. 2015, Table 1 (left), % test error: the CNN's, FCN's and the affine and TPS
# transformers' figures (those the project took from it); the paper has no similarity ST-CNN.
PAPER_ERROR = {
    "cnn": {"r": 1.2, "rts": 0.8, "p": 1.5, "e": 1.4},
    "st_cnn_affine": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.2},
    "st_cnn_similarity": {},
    "st_cnn_projective": {},
    "st_cnn_tps": {"r": 0.7, "rts": 0.5, "p": 0.8, "e": 1.1},
    "fcn": {"r": 2.1, "rts": 5.2, "p": 3.1, "e": 3.2},
    "st_fcn": {"r": 1.2, "rts": 0.8, "p": 1.5, "e": 2.7},
}
FULL = {"epochs": 5, "copies": 8, "per_class": None, "models": TABLE_MODELS, "variants": VARIANTS}
SMALL = {
    "epochs": 1,
    "copies": 1,
    "per_class": 20,
    "models": ("cnn", "st_cnn_affine"),
    "variants": ("rts",),
}
PICTURE_DIGITS = 8
UPRIGHT_DEG = 15.0  # a rectified R digit this close to upright counts as turned back
ROTATION_DIGITS = 2000  # the first eval digits that the rotation summary covers
HALF_TURN_SYMMETRIC = (0, 1, 8)  # digits that look the same upside down


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CI-sized smoke run")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="distortions to run")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to train")
    parser.add_argument("--epochs", type=int, help="epochs per model (full 5, small 1)")
    parser.add_argument("--copies", type=int, help="distorted copies per digit (full 8)")
    parser.add_argument("--per-class", type=int, help="source digits per class (all if unset)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="Adam's start rate")
    parser.add_argument("--seed", type=int, default=1, help="data and initialisation seed")
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        metavar="S",
        help="train every model against labels smoothed by S (0 to 1; default 0, none)",
    )
    parser.add_argument(
        "--elastic-alpha",
        type=float,
        default=0.0,
        metavar="A",
        help="with --redraw: warp the training digits elastically (sigma 4 px, strength A)",
    )
    parser.add_argument(
        "--equivariance-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="train the ST models' transformers with W times the rotation equivariance loss",
    )
    parser.add_argument(
        "--equivariance-angle",
        type=float,
        default=45.0,
        metavar="DEG",
        help="the equivariance loss turns training images by up to +-DEG degrees (default 45)",
    )
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="distort the training digits anew every epoch instead of reusing one draw",
    )
    parser.add_argument(
        "--rotation-warmup",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="with --redraw: widen R's rotations to --max-rotation over these epochs",
    )
    parser.add_argument(
        "--max-rotation",
        type=float,
        default=R_MAX_ANGLE,
        metavar="DEG",
        help=f"R's widest rotation, train and eval (default {R_MAX_ANGLE:g}; 0: upright digits)",
    )
    parser.add_argument(
        "--canvas",
        type=int,
        default=42,
        metavar="N",
        help=f"side of the square images the digits are drawn on (at least {SOURCE_SIZE})",
    )
    parser.add_argument(
        "--zoom",
        type=float,
        default=1.0,
        metavar="Z",
        help="magnify R's digits Z times about their centre, train and eval (1 to 2; --variants r)",
    )
    parser.add_argument(
        "--full-resolution-localization",
        action="store_true",
        help="ST-CNN localization nets without their first 2x2 pool (models.cnn_localization)",
    )
    parser.add_argument(
        "--localization-hidden-units",
        type=int,
        metavar="N",
        help="end the ST-CNN localization nets with a fully connected layer of N units",
    )
    parser.add_argument(
        "--st-iterations",
        type=int,
        default=1,
        metavar="N",
        help="passes of every transformer but TPS (models.build_model)",
    )
    parser.add_argument(
        "--tps-iterations",
        type=int,
        default=1,
        metavar="N",
        help="passes of the TPS transformer: N - 1 find an affine transform, the last the spline",
    )
    parser.add_argument(
        "--st-output-size",
        type=int,
        default=28,
        metavar="N",
        help=f"side of the image the ST models' transformers write (at least {CNN_MIN_SIZE})",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="distortions trained at once, each in its own process (CPU cores shared among them); "
        "above 1 it also gives TensorFlow cpu_count // jobs threads per process, even when "
        "one process runs (--jobs 2 --variants r: one thread, so that two such runs, e.g. two "
        "seeds, can share 2 cores)",
    )
    parser.add_argument(
        "--out", help="folder for the results (default: benchmarks/results; --small: a new one)"
    )
    args = parser.parse_args(argv)
    preset = SMALL if args.small else FULL
    for name in ("epochs", "copies", "per_class", "models", "variants"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    for name in (
        "epochs",
        "copies",
        "batch_size",
        "jobs",
        "st_iterations",
        "tps_iterations",
        "per_class",
        "localization_hidden_units",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:  # None: unset, where that is allowed
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.rotation_warmup < args.epochs:
        parser.error(f"--rotation-warmup must be 0 to epochs - 1, got {args.rotation_warmup}")
    if args.rotation_warmup and not args.redraw:
        parser.error("--rotation-warmup needs --redraw (a new draw every epoch)")
    if not 0 <= args.max_rotation <= R_MAX_ANGLE:
        parser.error(f"--max-rotation must be 0 to {R_MAX_ANGLE:g}, got {args.max_rotation:g}")
    if args.st_output_size < CNN_MIN_SIZE:
        parser.error(f"--st-output-size must be at least {CNN_MIN_SIZE}, got {args.st_output_size}")
    if args.canvas < SOURCE_SIZE:
        parser.error(f"--canvas must be at least {SOURCE_SIZE}, got {args.canvas}")
    if not 1 <= args.zoom <= 2:
        parser.error(f"--zoom must be 1 to 2, got {args.zoom:g}")
    if not args.elastic_alpha >= 0:  # NaN too
        parser.error(f"--elastic-alpha must be >= 0, got {args.elastic_alpha:g}")
    if args.elastic_alpha and not args.redraw:
        parser.error("--elastic-alpha needs --redraw (new warps every epoch)")
    if args.elastic_alpha and args.zoom != 1:
        parser.error("--elastic-alpha and --zoom do not combine")
    if args.zoom != 1 and list(args.variants) != ["r"]:
        parser.error(f"--zoom magnifies R digits only; give --variants r, got {args.variants}")
    if not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be 0 to 1 (1 excluded), got {args.label_smoothing:g}")
    if not args.equivariance_weight >= 0:
        parser.error(f"--equivariance-weight must be >= 0, got {args.equivariance_weight:g}")
    if not 0 < args.equivariance_angle <= 180:
        parser.error(f"--equivariance-angle must be in (0, 180], got {args.equivariance_angle:g}")
    if args.equivariance_weight and "st_cnn_tps" in args.models:
        parser.error("--equivariance-weight needs composable transforms; drop st_cnn_tps")
    if args.learning_rate <= 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    return args


def as_inputs(images):
    """uint8 [N, H, W] -> float32 [N, H, W, 1] in [0, 1], the models' input."""
    return (images[..., None] / np.float32(255)).astype(np.float32)


def draw_split(variant, split, seed, max_rotation, args, warp_alpha=0.0):
    """`make_split` on `args.canvas` with `args.copies` and `args.per_class`, R images turned
    by at most `max_rotation` degrees and magnified `args.zoom` times, digits bent by elastic
    warps of strength `warp_alpha`: (uint8 images, labels, records)."""
    images, labels, records = make_split(
        variant,
        args.copies,
        canvas=args.canvas,
        seed=seed,
        split=split,
        per_class=args.per_class,
        max_angle=max_rotation,  # only R images turn
        warp_alpha=warp_alpha,
    )
    if args.zoom != 1:
        images = magnified(records, args.zoom, args.canvas)
    return images, labels, records


def magnified(records, zoom, canvas):
    """The R images of `records` drawn again, magnified `zoom` times about the digit's centre:
    RTS's renderer with each record's angle, scale `zoom` and no shift."""
    digits = load_source()[0][[r["source_index"] for r in records]]
    params = [
        {"angle_deg": r["params"]["angle_deg"], "scale": zoom, "dx": 0, "dy": 0} for r in records
    ]
    return render("rts", digits, params, canvas)


def load_split(variant, split, args):
    """(float32 images [N, canvas, canvas, 1], labels, records) of `split`, drawn with seed
    `args.seed` (see `draw_split`)."""
    images, labels, records = draw_split(variant, split, args.seed, args.max_rotation, args)
    return as_inputs(images), labels, records


class Redraws(keras.utils.Sequence):
    """Training batches from a fresh draw of the distortions every epoch.

    `draw(epoch)` returns (uint8 images, labels) of that epoch's training split; keep it
    cached (functools.cache) to give every model the same draws. Keras calls `on_epoch_end`
    once per epoch (no enqueuer with the default workers=1).
    """

    def __init__(self, draw, batch_size):
        super().__init__()
        self.draw, self.batch_size, self.epoch = draw, batch_size, 0

    def __len__(self):
        return int(np.ceil(len(self.draw(self.epoch)[1]) / self.batch_size))

    def __getitem__(self, index):
        images, labels = self.draw(self.epoch)
        batch = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return as_inputs(images[batch]), labels[batch]

    def on_epoch_end(self):
        self.epoch += 1


def training_draws(variant, args):
    """A cached function epoch -> (uint8 images, labels): draw e has seed `seed * 1000 + e`
    (and on R, during `args.rotation_warmup`, rotations of at most `max_angle(e, args)`; digits
    bent first by elastic warps of strength `args.elastic_alpha`)."""

    @functools.cache
    def draw(epoch):
        images, labels, _ = draw_split(
            variant,
            "train",
            args.seed * 1000 + epoch,
            max_angle(epoch, args),
            args,
            warp_alpha=args.elastic_alpha,
        )
        return images, labels

    return draw


def max_angle(epoch, args):
    """The widest R rotation of epoch `epoch`'s draw: `args.max_rotation` (90 by default) times
    (epoch + 1) / (warmup + 1) during the warm-up, then `args.max_rotation`."""
    return args.max_rotation * min(1.0, (epoch + 1) / (args.rotation_warmup + 1))


def training_set(variant, args):
    """A function -> a fresh model.fit input {"x", ...} and the number of images per epoch:
    the draw with seed `args.seed`, or with `--redraw` a `Redraws` over `training_draws`."""
    if args.redraw:
        draws = training_draws(variant, args)
        return lambda: {"x": Redraws(draws, args.batch_size)}, len(draws(0)[1])
    train_x, train_y, _ = load_split(variant, "train", args)
    return lambda: {"x": train_x, "y": train_y, "batch_size": args.batch_size}, len(train_y)


def classification_loss(label_smoothing):
    """Cross-entropy on integer labels; with `label_smoothing` s > 0, against targets that put
    1 - s on the label and s spread evenly over all classes (Szegedy et al. 2016)."""
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()

    def smoothed_cross_entropy(labels, probabilities):
        classes = keras.backend.int_shape(probabilities)[-1]
        labels = keras.backend.cast(keras.backend.flatten(labels), "int32")
        return keras.losses.categorical_crossentropy(
            keras.backend.one_hot(labels, classes), probabilities, label_smoothing=label_smoothing
        )

    return smoothed_cross_entropy


Trained = collections.namedtuple("Trained", "model fitted history wall_s cpu_s")
Trained.__doc__ = """A trained model; `fitted` is what `fit` trained: `model`, or the wrapper
that adds the equivariance loss around it; `history` is `fit`'s per-epoch metrics."""


def train(name, fit_input, train_images, evaluation, args):
    """Train one model with the shared recipe on `fit_input()` (see `training_set`), checking
    on `evaluation` (eval images, labels) every epoch; -> `Trained`.
    """
    from stn_model.equivariance import with_rotation_equivariance
    from stn_model.models import build_model

    eval_x, eval_y = evaluation
    keras.utils.set_random_seed(args.seed)
    model = build_model(
        name,
        input_shape=eval_x.shape[1:],
        num_classes=10,
        st_output_size=(args.st_output_size, args.st_output_size),
        full_resolution_localization=args.full_resolution_localization,
        localization_hidden_units=args.localization_hidden_units,
        st_iterations=args.tps_iterations if name == "st_cnn_tps" else args.st_iterations,
    )
    fitted = model
    if args.equivariance_weight and name.startswith("st_"):
        fitted = with_rotation_equivariance(
            model, args.equivariance_weight, args.equivariance_angle
        )
    steps = args.epochs * int(np.ceil(train_images / args.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, steps)
    fitted.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=classification_loss(args.label_smoothing),
        metrics=["accuracy"],
    )
    wall, cpu = time.perf_counter(), time.process_time()
    history = fitted.fit(
        **fit_input(),
        epochs=args.epochs,
        validation_data=(eval_x, eval_y),
        verbose=2,
    )
    return Trained(
        model, fitted, history.history, time.perf_counter() - wall, time.process_time() - cpu
    )


def save_pictures(variant, model, eval_x, eval_y, out):
    """Rectification and sampling-grid pictures of a trained ST model on eval digits."""
    from stn_model.models import find_spatial_transformer
    from stn_model.visualize import plot_rectification, plot_sampling_grids

    images, labels = eval_x[:PICTURE_DIGITS], eval_y[:PICTURE_DIGITS]
    rectified, _, grid = find_spatial_transformer(model).rectify(images, training=False)
    where = f"{model.name} on {variant.upper()} eval digits"
    plot_rectification(
        images,
        np.asarray(rectified),
        os.path.join(out, f"rectification_{variant}.png"),
        labels=labels,
        title=f"{where}: input (top), rectified (bottom)",
    )
    plot_sampling_grids(
        images,
        np.asarray(grid),
        os.path.join(out, f"sampling_grid_{variant}.png"),
        align_corners=find_spatial_transformer(model).align_corners,
        title=f"{where}: sampling grids",
    )


def grid_rotation_deg(grids):
    """The rotation in degrees of each sampling grid [B, H, W, 2] (x right, y down, so a
    positive angle turns clockwise on screen): the mean direction of its rows and of its
    columns, averaged."""
    grids = np.asarray(grids, dtype=np.float64)
    along_x = np.diff(grids, axis=2).mean(axis=(1, 2))  # where the output's x axis points
    along_y = np.diff(grids, axis=1).mean(axis=(1, 2))  # where the output's y axis points
    angle_x = np.arctan2(along_x[:, 1], along_x[:, 0])
    angle_y = np.arctan2(-along_y[:, 0], along_y[:, 1])
    return np.degrees(np.angle(np.exp(1j * angle_x) + np.exp(1j * angle_y)))


def grid_rotations(model, eval_x):
    """The rotation in degrees of an R-trained ST model's sampling grid over each of `eval_x`
    (see `grid_rotation_deg`)."""
    from stn_model.models import find_spatial_transformer

    transformer = find_spatial_transformer(model)
    grids = [
        np.asarray(transformer.rectify(eval_x[i : i + 500], training=False)[2])
        for i in range(0, len(eval_x), 500)
    ]
    return np.concatenate([grid_rotation_deg(grid) for grid in grids])


def residual_deg(turned, true, labels):
    """What is left of each R digit's rotation `true` after its grid turned it by `turned`
    (degrees, one per digit of class `labels`), 0 to 180. A 0, 1 or 8 turned upside down
    counts as upright: it looks the same, so the transformer may turn it either way."""
    turned, true = np.asarray(turned, dtype=np.float64), np.asarray(true, dtype=np.float64)
    residual = np.abs((true + turned + 180) % 360 - 180)
    symmetric = np.isin(labels, HALF_TURN_SYMMETRIC)
    residual[symmetric] = np.minimum(residual[symmetric], 180 - residual[symmetric])
    return residual


def rotation_summary(turned, true, labels):
    """How grid rotations `turned` undo true angles `true` (degrees, one per digit of class
    `labels`): {"slope", "correlation"} of turned against true (slope -1: all upright again),
    and what is left of each digit's rotation after the grid (`residual_deg`), its
    "median_residual_deg" and the "upright_share" of digits left within UPRIGHT_DEG of upright.
    """
    residual = residual_deg(turned, true, labels)
    return {
        "slope": float(np.polyfit(true, turned, 1)[0]),
        "correlation": float(np.corrcoef(true, turned)[0, 1]),
        "median_residual_deg": float(np.median(residual)),
        "upright_share": float(np.mean(residual <= UPRIGHT_DEG)),
    }


def paper(model, variant):
    value = PAPER_ERROR[model].get(variant)
    return "n/a" if value is None else f"{value:.1f}"


def error_table(results, args):
    """Markdown: one row per model, ours and the paper's error per distortion."""
    header = ["model"] + [f"{v.upper()} ours / paper" for v in args.variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in args.models:
        cells = [model]
        for variant in args.variants:
            run = results.get(f"{variant}/{model}")
            ours = f"{run['error_pct']:.2f} ± {run['error_se_pct']:.2f}" if run else "–"
            cells.append(f"{ours} / {paper(model, variant)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(results, args):
    """The issue's goals, checked on what ran: ST-CNN against CNN, and ST-CNN on RTS."""
    lines = []
    for variant in args.variants:
        cnn = results.get(f"{variant}/cnn")
        for model in ST_CNN_MODELS:
            st = results.get(f"{variant}/{model}")
            if not (cnn and st):
                continue
            # the models absent from the paper are held to the affine one's cut
            paper_st = PAPER_ERROR[model].get(variant, PAPER_ERROR["st_cnn_affine"][variant])
            paper_cut = 1 - paper_st / PAPER_ERROR["cnn"][variant]
            cut = 1 - st["error_pct"] / cnn["error_pct"] if cnn["error_pct"] else 0.0
            verdict = "met" if cut >= paper_cut else "NOT met"
            fewer = "fewer" if cut >= 0 else "more"
            lines.append(
                f"- {variant.upper()}: {model} {st['error_pct']:.2f}% vs cnn "
                f"{cnn['error_pct']:.2f}%: {100 * abs(cut):.0f}% {fewer} errors "
                f"(paper's ST-CNN cut {100 * paper_cut:.0f}%): {verdict}"
            )
            if variant == "rts":
                verdict = "met" if st["error_pct"] <= 2.0 else "NOT met"
                lines.append(f"- RTS: {model} error {st['error_pct']:.2f}% <= 2.0%: {verdict}")
    return lines


def rotation_lines(results):
    """One line per ST model trained on R: how far its grids turn the digits back."""
    lines = []
    for key, run in results.items():
        if "rotation" in run:
            r = run["rotation"]
            lines.append(
                f"- R: {key.split('/')[1]} turns {100 * r['upright_share']:.0f}% of the digits "
                f"back to within {UPRIGHT_DEG:g} degrees of upright (median "
                f"{r['median_residual_deg']:.0f} degrees left; grid rotation vs true angle: "
                f"slope {r['slope']:.2f}, correlation {r['correlation']:.2f}, -1 is upright)"
            )
    return lines


def write_reports(results, args, command):
    """accuracy.json and accuracy.md in args.out (rewritten after every distortion)."""
    settings = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "copies",
            "redraw",
            "rotation_warmup",
            "max_rotation",
            "canvas",
            "zoom",
            "full_resolution_localization",
            "localization_hidden_units",
            "st_iterations",
            "tps_iterations",
            "st_output_size",
            "per_class",
            "batch_size",
            "learning_rate",
            "label_smoothing",
            "elastic_alpha",
            "equivariance_weight",
            "equivariance_angle",
            "seed",
            "jobs",
        )
    }
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump({"command": command, "settings": settings, "runs": results}, f, indent=2)
    detail = [
        "| distortion | model | error % | paper % | eval images | train images | "
        "fit wall s | fit CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, run in results.items():
        variant, model = key.split("/")
        detail.append(
            f"| {variant.upper()} | {model} | {run['error_pct']:.2f} | {paper(model, variant)} | "
            f"{run['eval_images']} | {run['train_images']} | {run['fit_wall_s']:.0f} | "
            f"{run['fit_cpu_s']:.0f} | {run['peak_rss_mib']:.0f} |"
        )
    text = [
        "# Accuracy against the paper (Jaderberg et al. 2015, Table 1)",
        "",
        f"Command: `{command}`",
        "",
        f"Recipe (all models): {json.dumps(settings)}; Adam, cosine decay to 0.",
        "",
        "% test error on the eval split (± one standard error over its source digits, whose "
        "copies are not independent), ours / paper:",
        "",
        error_table(results, args),
        "",
        *goal_lines(results, args),
        *rotation_lines(results),
        "",
        "Peak RSS is its process's peak so far (the models of a distortion train one after "
        "another in one process).",
        "",
        *detail,
        "",
    ]
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write("\n".join(text))


def run_variant(variant, args):
    """Trains every model of `args.models` on one distortion; -> {"variant/model": result}."""
    from stn_model.visualize import plot_training_curves

    if args.jobs > 1:
        import tensorflow as tf

        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    eval_x, eval_y, records = load_split(variant, "eval", args)
    sources = [r["source_index"] for r in records]
    fit_input, train_images = training_set(variant, args)
    results, histories, pictured = {}, {}, False
    for name in args.models:
        print(f"== {variant} / {name}", flush=True)
        model, _, history, wall, cpu = train(name, fit_input, train_images, (eval_x, eval_y), args)
        predicted = model.predict(eval_x, batch_size=512, verbose=0).argmax(axis=1)
        error, error_se = error_over_digits(predicted != eval_y, sources)
        print(f"== {variant} / {name}: test error {error:.2f}%", flush=True)
        result = results[f"{variant}/{name}"] = {
            "error_pct": error,
            "error_se_pct": error_se,
            "paper_error_pct": PAPER_ERROR[name].get(variant),
            "train_images": train_images,
            "eval_images": len(eval_y),
            "fit_wall_s": wall,
            "fit_cpu_s": cpu,
            "peak_rss_mib": peak_rss_mib(),
            "history": history,
        }
        residual = None
        if variant == "r" and name.startswith("st_cnn") and args.max_rotation > 0:
            turned = grid_rotations(model, eval_x)
            true = [r["params"]["angle_deg"] for r in records]
            first = slice(ROTATION_DIGITS)
            result["rotation"] = rotation_summary(turned[first], true[first], eval_y[first])
            residual = residual_deg(turned, true, eval_y)
            print(f"== {variant} / {name}: rotation recovery {result['rotation']}", flush=True)
        predictions = os.path.join(args.out, f"predictions_{variant}_{name}.npz")
        save_predictions(predictions, predicted, eval_y, records, residual)
        histories[name] = history
        if name.startswith("st_cnn") and not pictured:
            save_pictures(variant, model, eval_x, eval_y, args.out)
            pictured = True
    plot_training_curves(
        histories,
        os.path.join(args.out, f"training_curves_{variant}.png"),
        title=f"{variant.upper()}: training curves",
    )
    return results


def run_all(args, command):
    """Runs the distortions, `args.jobs` at a time; writes the reports as each one finishes."""
    results = {}

    def finished(variant_results):
        results.update(variant_results)
        write_reports(in_table_order(results, args), args, command)

    if args.jobs == 1 or len(args.variants) == 1:
        for variant in args.variants:
            finished(run_variant(variant, args))
    else:
        spawn = multiprocessing.get_context("spawn")  # TensorFlow does not survive a fork
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(run_variant, variant, args) for variant in args.variants]
            for future in concurrent.futures.as_completed(futures):
                finished(future.result())
    return in_table_order(results, args)


def in_table_order(results, args):
    """`results` ordered by distortion, then model, as the arguments list them."""
    keys = [f"{variant}/{model}" for variant in args.variants for model in args.models]
    return {key: results[key] for key in keys if key in results}


def output_folder(args):
    """--out; by default benchmarks/results, or for --small a new temporary folder, so that a
    smoke run does not replace the full results kept there."""
    if args.out:
        return args.out
    return tempfile.mkdtemp(prefix="bench-accuracy-small-") if args.small else RESULTS_DIR


def main(argv=None):
    args = parse_args(argv)
    args.out = output_folder(args)
    os.makedirs(args.out, exist_ok=True)
    command = "benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_all(args, command)
    rows = [
        (
            key.split("/")[0],
            key.split("/")[1],
            run["error_pct"],
            paper(*reversed(key.split("/"))),
            run["fit_wall_s"],
            run["fit_cpu_s"],
            run["peak_rss_mib"],
        )
        for key, run in results.items()
    ]
    print_table(
        ["distortion", "model", "error %", "paper %", "fit wall s", "fit CPU s", "peak RSS MiB"],
        rows,
    )
    print("\n".join(goal_lines(results, args) + rotation_lines(results)))
    print(f"written: {os.path.join(args.out, 'accuracy.md')} and accuracy.json, pictures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
