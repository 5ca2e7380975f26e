"""Train-step time of the ST-CNNs (affine, projective, TPS) over the CNN baseline, same batch.

Every model is `stn_model.build_model(name)` (42 x 42 x 1 input, 10 classes; the ST-CNNs
classify a 28 x 28 rectified image), compiled with Adam and sparse categorical cross-entropy.
One train step is `model.train_on_batch(x, y)` on a fixed batch of random images (the cost
does not depend on the pixel values). The models are timed in turn, round after round
(`_util.time_calls`), and reported as median wall-clock and CPU milliseconds per step and as
ratios to the CNN timed in the same run. Target: ST-CNN (affine) at most 1.25x the CNN.
The row `st_cnn_affine@full` rectifies to the input size instead of 28 x 28: its classifier
costs what the CNN's does, so it shows what the transformer itself adds.

    .venv/bin/python benchmarks/bench_train_step.py
    .venv/bin/python benchmarks/bench_train_step.py --batch-size 64 --models cnn st_fcn
"""

import argparse

import numpy as np
from _util import peak_rss_mib, print_table, time_calls

import stn_model  # sets TF_USE_LEGACY_KERAS before TensorFlow loads

BASELINE = "cnn"
TARGET = ("st_cnn_affine", 1.25)


FULL_SIZE = "st_cnn_affine@full"


def train_step(name, batch_size, input_shape):
    """A zero-argument function that runs one training step of model `name` (or FULL_SIZE)."""
    if name == FULL_SIZE:
        model = stn_model.build_model(
            "st_cnn_affine", input_shape=input_shape, st_output_size=input_shape[:2]
        )
    else:
        model = stn_model.build_model(name, input_shape=input_shape)
    model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, batch_size)
    return lambda: model.train_on_batch(x, y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=42, help="input height and width")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=stn_model.MODEL_NAMES,
        default=["st_cnn_affine", "st_cnn_projective", "st_cnn_tps"],
        help=f"models to time against {BASELINE!r} (always timed)",
    )
    args = parser.parse_args()
    names = [BASELINE, *(n for n in args.models if n != BASELINE), FULL_SIZE]
    input_shape = (args.size, args.size, 1)
    steps = {name: train_step(name, args.batch_size, input_shape) for name in names}
    timings = time_calls(steps, repeats=args.repeats, warmup=3)
    base = timings[BASELINE]
    print(
        f"train step, batch {args.batch_size} x {args.size}x{args.size}x1, "
        f"median of {args.repeats} rounds"
    )
    print_table(
        ["model", "wall ms", "CPU ms", f"wall / {BASELINE}", f"CPU / {BASELINE}"],
        [
            [name, t.wall_ms, t.cpu_ms, t.ratio(base).wall_ms, t.ratio(base).cpu_ms]
            for name, t in timings.items()
        ],
    )
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    name, limit = TARGET
    if name in timings:
        ratio = timings[name].ratio(base)
        print(
            f"target: {name} at most {limit}x {BASELINE}: wall {ratio.wall_ms:.2f}x, "
            f"CPU {ratio.cpu_ms:.2f}x"
        )


if __name__ == "__main__":
    main()
