"""Sampler speed: forward + backward of bilinear_sample against PyTorch's F.grid_sample on CPU.

For each shape, times one training-style step (sample, loss = sum(output * weights), gradients
with respect to the images and the grid): with the native op (eager and tf.function) when it is
built, with the pure-TF path (eager, tf.function, XLA), and the same step in PyTorch when torch
is importable. The ratios and largest output differences are against PyTorch, or without it
against the pure-TF path in tf.function. All modes of one shape are timed in turn, round after
round, so the ratios compare like with like on a shared machine. Prints a table and the peak RSS.

    .venv/bin/python benchmarks/bench_sampler.py [--threads N] [--repeats R]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from _util import peak_rss_mib, print_table, time_calls

FALLBACK_BASELINE = "pure tf.function"  # the yardstick when PyTorch is not importable

# (batch, input height, input width, channels, output height, output width, repeats scale)
SHAPES = [
    (256, 28, 28, 1, 28, 28, 1.0),
    (64, 60, 60, 1, 30, 30, 1.0),
    (32, 224, 224, 3, 224, 224, 0.25),
]


def random_affine(rng, batch):
    """Rotations of +-45 degrees, scales 0.8-1.2 and shifts, so some points leave the image."""
    angle = rng.uniform(-np.pi / 4, np.pi / 4, batch)
    scale = rng.uniform(0.8, 1.2, batch)
    shift = rng.uniform(-0.2, 0.2, (batch, 2))
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    rows = [np.stack([cos, -sin, shift[:, 0]], -1), np.stack([sin, cos, shift[:, 1]], -1)]
    return np.stack(rows, 1).astype(np.float32)


def tensorflow_steps():
    """{mode: step(images, grid, weights) -> (output, images_grad, grid_grad)}."""
    import tensorflow as tf

    from stn_model import bilinear_sample
    from stn_model.native import load
    from stn_model.sampling import portable_ops

    def step(images, grid, weights):
        with tf.GradientTape() as tape:
            tape.watch([images, grid])
            output = bilinear_sample(images, grid)
            loss = tf.reduce_sum(output * weights)
        return (output, *tape.gradient(loss, [images, grid]))

    def pure_step(images, grid, weights):
        with portable_ops():  # the pure-TF path, also where the native one would apply
            return step(images, grid, weights)

    steps = {}
    if load() is not None:
        steps.update({"native eager": step, "native tf.function": tf.function(step)})
    steps.update(
        {
            "pure eager": pure_step,
            "pure tf.function": tf.function(pure_step),
            "pure xla": tf.function(pure_step, jit_compile=True),
        }
    )
    return steps


def torch_step():
    """PyTorch's step on NCHW copies of the inputs, or None when torch is not importable."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None

    def step(images, grid, weights):
        output = F.grid_sample(images, grid, mode="bilinear", align_corners=False)
        loss = (output * weights).sum()
        return (output, *torch.autograd.grad(loss, [images, grid]))

    return step


def to_torch(images, grid, weights):
    import torch

    images = torch.tensor(images).permute(0, 3, 1, 2).contiguous().requires_grad_()
    grid = torch.tensor(grid).requires_grad_()
    return images, grid, torch.tensor(weights).permute(0, 3, 1, 2).contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="intra-op threads of TF and torch")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per shape")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from stn_model import affine_grid

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    steps = tensorflow_steps()
    reference = torch_step()
    if reference is not None and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    baseline = "pytorch" if reference is not None else FALLBACK_BASELINE

    rows = []
    for batch, height, width, channels, out_h, out_w, scale in SHAPES:
        rng = np.random.default_rng(0)
        images = rng.uniform(0, 1, (batch, height, width, channels)).astype(np.float32)
        grid = affine_grid(random_affine(rng, batch), (out_h, out_w)).numpy()
        weights = rng.normal(size=(batch, out_h, out_w, channels)).astype(np.float32)
        tf_args = [tf.constant(a) for a in (images, grid, weights)]
        # Both sides return their tensors as computed, with no copy to NumPy: on CPU an eager
        # result is ready when the call returns, as PyTorch's is.
        calls = {
            mode: (lambda step=step, tf_args=tf_args: step(*tf_args))
            for mode, step in steps.items()
        }
        if reference is not None:
            torch_args = to_torch(images, grid, weights)
            calls["pytorch"] = lambda torch_args=torch_args: reference(*torch_args)
            theirs = reference(*torch_args)[0].detach().permute(0, 2, 3, 1).numpy()
        else:
            theirs = steps[baseline](*tf_args)[0].numpy()
        differences = {
            mode: f"{np.abs(step(*tf_args)[0].numpy() - theirs).max():.1e}"
            for mode, step in steps.items()
        }
        timings = time_calls(calls, repeats=max(3, round(args.repeats * scale)))
        label = f"[{batch},{height},{width},{channels}]->{out_h}x{out_w}"
        for mode, timing in timings.items():
            ratio = timing.ratio(timings[baseline])
            row = [label, mode, timing.wall_ms, timing.cpu_ms, ratio.wall_ms, ratio.cpu_ms]
            rows.append([*row, differences.get(mode, "")])
    print("bilinear_sample forward+backward, float32, zeros padding, align_corners=False")
    print_table(
        [
            *("shape", "mode", "wall ms", "cpu ms"),
            *(f"wall/{baseline}", f"cpu/{baseline}", f"max|ours-{baseline}|"),
        ],
        rows,
    )
    if reference is None:
        print(
            f"PyTorch is not importable: ratios against {baseline} "
            "(install torch==2.13.0 for the PyTorch comparison, see bench.sh)."
        )
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
