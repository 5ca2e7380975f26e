"""benchmarks/bench_accuracy.py: tables and goals on hand-made results, and a real --small run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))

import bench_accuracy  # noqa: E402  (lives in benchmarks/, put on the path just above)


def run(error):
    return {"error_pct": error, "error_se_pct": 0.1}


def test_small_preset_and_overrides():
    args = bench_accuracy.parse_args(["--small", "--epochs", "3"])
    assert (args.epochs, args.copies, args.per_class) == (3, 1, 20)
    assert args.models == ("cnn", "st_cnn_affine") and args.variants == ("rts",)
    full = bench_accuracy.parse_args(["--variants", "rts", "p"])
    assert (full.epochs, full.copies, full.per_class) == (5, 8, None)
    assert full.variants == ["rts", "p"] and len(full.models) == 6
    assert not full.full_resolution_localization


def test_a_small_run_does_not_overwrite_the_kept_results(tmp_path):
    """The smoke run's table would replace benchmarks/results/accuracy.md, the full one."""
    small = bench_accuracy.output_folder(bench_accuracy.parse_args(["--small"]))
    assert small != bench_accuracy.RESULTS_DIR and os.listdir(small) == []
    os.rmdir(small)
    full = bench_accuracy.parse_args(["--variants", "rts"])
    assert bench_accuracy.output_folder(full) == bench_accuracy.RESULTS_DIR
    chosen = bench_accuracy.parse_args(["--small", "--out", str(tmp_path)])
    assert bench_accuracy.output_folder(chosen) == str(tmp_path)


@pytest.mark.parametrize(
    ("option", "name", "features", "iterations", "side"),
    [
        (["--full-resolution-localization"], "st_cnn_affine", 2000, 1, 28),
        (["--localization-hidden-units", "50"], "st_cnn_affine", 50, 1, 28),
        (["--st-iterations", "2"], "st_cnn_affine", 500, 2, 28),
        (["--st-iterations", "2"], "st_cnn_tps", 500, 1, 28),  # TPS has its own option
        (["--tps-iterations", "2"], "st_cnn_tps", 500, 2, 28),
        (["--tps-iterations", "2"], "st_cnn_affine", 500, 1, 28),
        (["--st-output-size", "42"], "st_cnn_affine", 500, 1, 42),
        (["--equivariance-weight", "1"], "st_cnn_projective", 500, 1, 28),
    ],
)
def test_transformer_options_reach_the_trained_model(option, name, features, iterations, side):
    from stn_model.models import find_spatial_transformer

    args = bench_accuracy.parse_args(["--small", *option])
    images = np.random.default_rng(0).random((16, 42, 42, 1), dtype=np.float32)
    labels = np.arange(16) % 10
    model, fitted, history, _, _ = bench_accuracy.train(
        name,
        lambda: {"x": images, "y": labels, "batch_size": 8},
        len(labels),
        (images, labels),
        args,
    )
    assert fitted.optimizer.iterations.numpy() == 2  # one epoch of two batches
    if args.equivariance_weight:
        wrapper = fitted.get_layer("rotation_equivariance")
        assert (wrapper.weight, wrapper.max_angle) == (1.0, pytest.approx(np.radians(45)))
        assert wrapper.transformer is find_spatial_transformer(model)
    else:
        assert fitted is model
    transformer = find_spatial_transformer(model)
    assert transformer.head.kernel.shape[0] == features
    assert transformer.iterations == iterations
    assert tuple(transformer.output_size) == (side, side)
    # 9x9 valid conv, pool 2, 7x7 valid conv, pool 2: 28 -> 20, 10, 4, 2 and 42 -> 34, 17, 11, 5
    classifier_side = {28: 2, 42: 5}[side]
    assert model.get_layer("probabilities").kernel.shape[0] == 32 * classifier_side**2
    assert len(history["loss"]) == args.epochs == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--copies", "-1"],
        ["--models", "vgg"],
        ["--jobs", "0"],
        ["--st-iterations", "0"],
        ["--tps-iterations", "0"],
        ["--localization-hidden-units", "0"],
        ["--per-class", "0"],
        ["--rotation-warmup", "2"],  # without --redraw
        ["--rotation-warmup", "5", "--redraw", "--epochs", "5"],  # no full-angle epoch left
        ["--max-rotation", "91"],
        ["--max-rotation", "-1"],
        ["--max-rotation", "nan"],
        ["--canvas", "27"],
        ["--st-output-size", "23"],
        ["--zoom", "0.9", "--variants", "r"],
        ["--zoom", "2.5", "--variants", "r"],
        ["--zoom", "1.2"],  # every distortion, where it magnifies R only
        ["--label-smoothing", "1"],
        ["--label-smoothing", "-0.1"],
        ["--elastic-alpha", "34"],  # without --redraw
        ["--elastic-alpha", "-1", "--redraw"],
        ["--elastic-alpha", "nan", "--redraw"],
        ["--elastic-alpha", "34", "--redraw", "--zoom", "1.2", "--variants", "r"],
        ["--equivariance-weight", "-1"],
        ["--equivariance-weight", "nan"],
        ["--equivariance-weight", "1", "--models", "cnn", "st_cnn_tps"],
        ["--equivariance-angle", "0"],
        ["--equivariance-angle", "181"],
    ],
)
def test_bad_options_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_accuracy.parse_args(argv)
    assert stop.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_label_smoothing_moves_the_target_off_the_label():
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), size=4).astype(np.float32)
    labels = np.array([3, 0, 9, 3])
    # smoothing 0.2 over 10 classes: 0.02 on every class, 0.8 more on the label
    target = np.full((4, 10), 0.02)
    target[np.arange(4), labels] += 0.8
    smoothed = bench_accuracy.classification_loss(0.2)(labels.astype(np.float32), probabilities)
    assert np.asarray(smoothed) == pytest.approx(-(target * np.log(probabilities)).sum(1), rel=1e-5)
    plain = bench_accuracy.classification_loss(0.0)(labels, probabilities)
    expected = -np.log(probabilities[np.arange(4), labels]).mean()
    assert float(plain) == pytest.approx(expected, rel=1e-5)


def test_every_model_can_be_chosen_and_the_full_run_is_the_documented_six():
    from stn_model import MODEL_NAMES

    assert sorted(bench_accuracy.MODELS) == sorted(MODEL_NAMES)
    assert len(bench_accuracy.FULL["models"]) == 6
    assert "st_cnn_similarity" not in bench_accuracy.FULL["models"]


def test_error_table_puts_ours_beside_the_paper():
    args = bench_accuracy.parse_args(
        ["--variants", "rts", "e", "--models", "cnn", "st_cnn_projective"]
    )
    table = bench_accuracy.error_table(
        {"rts/cnn": run(1.5), "rts/st_cnn_projective": run(0.75)}, args
    ).splitlines()
    assert table[0] == "| model | RTS ours / paper | E ours / paper |"
    assert table[2] == "| cnn | 1.50 ± 0.10 / 0.8 | – / 1.4 |"
    assert table[3] == "| st_cnn_projective | 0.75 ± 0.10 / n/a | – / n/a |"


def test_results_come_out_in_table_order_whatever_finished_first():
    args = bench_accuracy.parse_args(["--variants", "rts", "r", "--models", "cnn", "st_fcn"])
    finished = {"r/st_fcn": run(1), "rts/st_fcn": run(2), "r/cnn": run(3), "rts/cnn": run(4)}
    ordered = bench_accuracy.in_table_order(finished, args)
    assert list(ordered) == ["rts/cnn", "rts/st_fcn", "r/cnn", "r/st_fcn"]


def test_goals_compare_the_cut_with_the_papers():
    args = bench_accuracy.parse_args(["--variants", "rts", "r", "e"])
    # Paper cuts: RTS 1 - 0.5 / 0.8 = 37.5%; R (TPS) 1 - 0.7 / 1.2 = 42%; E (TPS) 1 - 1.1 / 1.4
    # = 21%. Ours: 1 - 1.0 / 2.0 = 50% and 1 - 1.5 / 2.0 = 25%.
    results = {
        "rts/cnn": run(2.0),
        "rts/st_cnn_affine": run(1.0),
        "r/cnn": run(2.0),
        "r/st_cnn_tps": run(1.5),
        "e/cnn": run(2.0),
        "e/st_cnn_tps": run(1.5),
        "e/st_cnn_similarity": run(1.6),
        "e/st_cnn_affine": run(2.5),
    }
    lines = bench_accuracy.goal_lines(results, args)
    assert lines == [
        "- RTS: st_cnn_affine 1.00% vs cnn 2.00%: 50% fewer errors (paper's ST-CNN cut 38%): met",
        "- RTS: st_cnn_affine error 1.00% <= 2.0%: met",
        "- R: st_cnn_tps 1.50% vs cnn 2.00%: 25% fewer errors (paper's ST-CNN cut 42%): NOT met",
        "- E: st_cnn_affine 2.50% vs cnn 2.00%: 25% more errors (paper's ST-CNN cut 14%): NOT met",
        "- E: st_cnn_tps 1.50% vs cnn 2.00%: 25% fewer errors (paper's ST-CNN cut 21%): met",
        "- E: st_cnn_similarity 1.60% vs cnn 2.00%: 20% fewer errors (paper's ST-CNN cut 14%): met",
    ]


@pytest.mark.parametrize("degrees", [-75.0, -10.0, 0.0, 33.0, 89.0])
def test_grid_rotation_reads_back_the_angle_of_an_affine_grid(degrees):
    from stn_model.grids import affine_grid

    # A zoom, a shift and a non-square output must not change the angle read back.
    phi, scale = np.radians(degrees), 0.7
    theta = [
        [scale * np.cos(phi), -scale * np.sin(phi), 0.2],
        [scale * np.sin(phi), scale * np.cos(phi), -0.1],
    ]
    grid = affine_grid(np.array([theta], np.float32), (20, 28))
    assert bench_accuracy.grid_rotation_deg(grid) == pytest.approx([degrees], abs=1e-3)


def test_a_grid_turning_by_minus_the_true_angle_puts_r_digits_upright():
    """The data's own renderer is the oracle for the sign that 'slope -1 is upright' claims."""
    from pipeline.distorted_mnist import load_source, make_split, render
    from stn_model.grids import affine_grid
    from stn_model.sampling import bilinear_sample

    images, _, records = make_split("r", 1, seed=3, split="eval", per_class=1)
    angles = np.radians([r["params"]["angle_deg"] for r in records])
    upright = render(
        "r",
        load_source()[0][[r["source_index"] for r in records]],
        [{"angle_deg": 0.0}] * len(records),
    ).astype(np.float32)

    def turned(phi):
        cos, sin, zero = np.cos(phi), np.sin(phi), np.zeros_like(phi)
        theta = np.stack([cos, -sin, zero, sin, cos, zero], axis=1).astype(np.float32)
        grid = affine_grid(theta, (42, 42))
        return np.asarray(bilinear_sample(images[..., None].astype(np.float32), grid))[..., 0], grid

    back, grid = turned(-angles)
    wrong_way, _ = turned(angles)
    assert np.abs(back - upright).mean() < 0.3 * np.abs(wrong_way - upright).mean()
    assert bench_accuracy.grid_rotation_deg(grid) == pytest.approx(-np.degrees(angles), abs=1e-3)


def test_rotation_summary_by_hand():
    # residuals |true + turned| wrapped to [0, 180]: 0, 0, 20, 180 (an 8: upside down is
    # upright, so 0), 70 (a 4: not), 170 (a 2 turned the wrong way round: 170, not 10)
    true = [30.0, -60.0, 50.0, 80.0, 80.0, 85.0]
    turned = [-30.0, 60.0, -30.0, 100.0, -10.0, 85.0]
    summary = bench_accuracy.rotation_summary(turned, true, [2, 3, 5, 8, 4, 2])
    assert summary["median_residual_deg"] == pytest.approx(10.0)  # of 0, 0, 0, 20, 70, 170
    assert summary["upright_share"] == pytest.approx(3 / 6)
    assert summary["slope"] == pytest.approx(np.polyfit(true, turned, 1)[0])
    perfect = bench_accuracy.rotation_summary([-10.0, 40.0, -89.0], [10.0, -40.0, 89.0], [1, 2, 3])
    assert (perfect["slope"], perfect["upright_share"]) == pytest.approx((-1.0, 1.0))


def test_rotation_lines_say_how_far_digits_are_turned_back():
    rotation = {
        "slope": -0.45,
        "correlation": -0.8,
        "median_residual_deg": 7.6,
        "upright_share": 0.782,
    }
    results = {"r/cnn": run(3.0), "r/st_cnn_affine": {**run(2.0), "rotation": rotation}}
    assert bench_accuracy.rotation_lines(results) == [
        "- R: st_cnn_affine turns 78% of the digits back to within 15 degrees of upright "
        "(median 8 degrees left; grid rotation vs true angle: slope -0.45, correlation -0.80, "
        "-1 is upright)"
    ]


def test_training_draws_are_new_every_epoch_and_shared_between_models():
    args = bench_accuracy.parse_args(["--per-class", "2", "--copies", "3", "--seed", "4"])
    draw = bench_accuracy.training_draws("rts", args)
    (first, labels0), (second, labels1) = draw(0), draw(1)
    assert first.shape == second.shape == (60, 42, 42) and first.dtype == np.uint8
    assert sorted(labels0) == sorted(labels1) == sorted(list(range(10)) * 6)
    assert not np.array_equal(first, second)
    assert draw(0)[0] is first  # cached: every model of the distortion trains on these
    from pipeline.distorted_mnist import make_split

    assert np.array_equal(first, make_split("rts", 3, seed=4000, split="train", per_class=2)[0])


def test_rotation_warmup_widens_r_draws_to_90_degrees_then_stays():
    args = bench_accuracy.parse_args(
        ["--redraw", "--rotation-warmup", "5", "--epochs", "8", "--per-class", "1"]
    )
    angles = [bench_accuracy.max_angle(epoch, args) for epoch in range(8)]
    assert angles == pytest.approx([15, 30, 45, 60, 75, 90, 90, 90])
    from pipeline.distorted_mnist import make_split

    draw = bench_accuracy.training_draws("r", args)
    for epoch, widest in ((0, 15), (6, 90)):
        wanted = make_split("r", 8, seed=1000 + epoch, split="train", per_class=1, max_angle=widest)
        assert np.array_equal(draw(epoch)[0], wanted[0])
    # other distortions ignore the warm-up
    rts = bench_accuracy.training_draws("rts", args)(0)[0]
    assert np.array_equal(rts, make_split("rts", 8, seed=1000, split="train", per_class=1)[0])


def test_max_rotation_narrows_r_in_training_and_eval_and_leaves_the_rest():
    argv = ["--redraw", "--rotation-warmup", "1", "--epochs", "3", "--per-class", "2"]
    args = bench_accuracy.parse_args([*argv, "--max-rotation", "30"])
    assert [bench_accuracy.max_angle(epoch, args) for epoch in range(3)] == [15, 30, 30]
    angles = [r["params"]["angle_deg"] for r in bench_accuracy.load_split("r", "eval", args)[2]]
    assert max(abs(a) for a in angles) <= 30 < 2 * max(abs(a) for a in angles)
    upright = bench_accuracy.parse_args([*argv, "--max-rotation", "0"])
    records = bench_accuracy.load_split("r", "eval", upright)[2]
    assert {r["params"]["angle_deg"] for r in records} == {0}
    images = bench_accuracy.training_draws("r", upright)(2)[0]  # 8 copies of 20 digits
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == 20  # all upright alike
    default = bench_accuracy.parse_args(argv)
    assert np.array_equal(
        bench_accuracy.load_split("rts", "eval", upright)[0],
        bench_accuracy.load_split("rts", "eval", default)[0],
    )


def test_elastic_alpha_bends_every_training_copy_anew_and_leaves_eval_alone():
    argv = ["--redraw", "--epochs", "3", "--per-class", "2", "--max-rotation", "0"]
    plain, bent = (
        bench_accuracy.parse_args(argv),
        bench_accuracy.parse_args([*argv, "--elastic-alpha", "16"]),
    )
    for epoch in (0, 1):
        images, labels = bench_accuracy.training_draws("r", bent)(epoch)
        upright, same_labels = bench_accuracy.training_draws("r", plain)(epoch)
        assert np.array_equal(labels, same_labels)
        # 8 upright copies of 20 digits: 20 distinct images unbent, 160 bent
        assert len(np.unique(images.reshape(len(images), -1), axis=0)) == 160
        changed = np.abs(images.astype(int) - upright).max(axis=(1, 2))
        assert (changed > 30).mean() > 0.9
        # still the same digit: most bent copies look most like their own upright digit
        distinct, own = np.unique(upright.reshape(len(upright), -1), axis=0, return_inverse=True)
        flat = images.reshape(len(images), -1).astype(float)
        closest = np.corrcoef(flat, distinct)[: len(flat), len(flat) :].argmax(axis=1)
        assert (closest == own.ravel()).mean() > 0.9
    both = np.concatenate([bench_accuracy.training_draws("r", bent)(e)[0] for e in (0, 1)])
    assert len(np.unique(both.reshape(len(both), -1), axis=0)) == 320  # new warps every epoch
    assert np.array_equal(
        bench_accuracy.load_split("r", "eval", bent)[0],
        bench_accuracy.load_split("r", "eval", plain)[0],
    )


def test_canvas_28_upright_hands_the_cnn_the_source_digits_themselves():
    from pipeline.distorted_mnist import load_source

    argv = ["--max-rotation", "0", "--per-class", "2", "--copies", "2", "--redraw"]
    small = bench_accuracy.parse_args([*argv, "--canvas", "28"])
    images, _, records = bench_accuracy.load_split("r", "eval", small)
    sources = load_source()[0][[r["source_index"] for r in records]]
    assert images.shape == (40, 28, 28, 1)
    assert np.array_equal(np.round(images[..., 0] * 255), sources)
    # the default 42 x 42 canvas holds the same digits with 7 blank pixels on every side
    wide = bench_accuracy.load_split("r", "eval", bench_accuracy.parse_args(argv))[0]
    assert np.array_equal(wide[:, 7:35, 7:35], images)
    assert not wide[:, :7].any() and not wide[:, 35:].any()
    assert not wide[:, :, :7].any() and not wide[:, :, 35:].any()
    assert bench_accuracy.training_draws("r", small)(3)[0].shape == (40, 28, 28)


@pytest.mark.parametrize(("canvas", "max_rotation"), [(28, 0), (42, 30)])
def test_zoom_magnifies_r_digits_about_their_centre(canvas, max_rotation):
    from scipy import ndimage

    from pipeline.distorted_mnist import canvas_centre, load_source

    argv = ["--variants", "r", "--per-class", "2", "--copies", "2", "--redraw"]
    argv += ["--canvas", str(canvas), "--max-rotation", str(max_rotation)]
    images, _, records = bench_accuracy.load_split("r", "eval", bench_accuracy.parse_args(argv))
    zoomed, _, same = bench_accuracy.load_split(
        "r", "eval", bench_accuracy.parse_args([*argv, "--zoom", "1.3"])
    )
    assert same == records  # the same digits, turned the same way
    # oracle: SciPy's affine map from canvas (row, col) to source, zero outside the source
    centre, source_centre = canvas_centre(canvas), 13.5
    for image, record in zip(zoomed[..., 0], records, strict=True):
        turn = np.deg2rad(record["params"]["angle_deg"])
        cos, sin = np.cos(turn), np.sin(turn)
        matrix = np.array([[cos, sin], [-sin, cos]]) / 1.3
        offset = source_centre - matrix @ [centre, centre]
        source = load_source()[0][record["source_index"]].astype(float)
        want = ndimage.affine_transform(
            source, matrix, offset, (canvas, canvas), order=1, mode="grid-constant"
        )
        assert np.abs(np.round(image * 255) - np.clip(np.rint(want), 0, 255)).max() <= 1
    assert (zoomed > 0).sum() > 1.5 * (images > 0).sum()  # 1.3 x 1.3 = 1.69 times the ink, about
    plain, zoomed = (
        bench_accuracy.training_draws("r", bench_accuracy.parse_args([*argv, "--zoom", z]))(0)[0]
        for z in ("1", "1.3")
    )
    assert (zoomed > 0).sum() > 1.5 * (plain > 0).sum()  # the training draws too


def test_keras_fit_takes_one_draw_per_epoch_in_order():
    import tf_keras as keras

    served = []

    class Recorded(bench_accuracy.Redraws):
        def __getitem__(self, index):
            served.append((self.epoch, index))
            return super().__getitem__(index)

    rng = np.random.default_rng(0)

    def draw(epoch):
        return rng.integers(0, 256, (10, 6, 6), dtype=np.uint8), np.arange(10) % 3

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Flatten(input_shape=(6, 6, 1)), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(Recorded(draw, batch_size=4), epochs=3, verbose=0)
    assert len(history.history["loss"]) == 3
    # Keras peeks at batch 0 once before training; then ceil(10 / 4) = 3 batches per epoch,
    # all from that epoch's draw, epochs in order.
    assert [epoch for epoch, _ in served] == sorted(epoch for epoch, _ in served)
    for epoch in range(3):
        assert {index for e, index in served if e == epoch} == {0, 1, 2}
    assert len(served) in (9, 10)


@pytest.mark.slow
def test_small_run_writes_tables_json_and_pictures(tmp_path):
    out = tmp_path / "results"
    command = [
        "benchmarks/bench_accuracy.py",
        *("--small", "--redraw", "--rotation-warmup", "1", "--epochs", "2"),
        *("--variants", "rts", "r", "--jobs", "2"),
    ]
    done = subprocess.run(
        [sys.executable, *command, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "accuracy.json").read_text())
    assert list(report["runs"]) == ["rts/cnn", "rts/st_cnn_affine", "r/cnn", "r/st_cnn_affine"]
    assert report["settings"]["redraw"] and report["settings"]["rotation_warmup"] == 1
    for key, paper in (("rts/cnn", 0.8), ("rts/st_cnn_affine", 0.5)):
        result = report["runs"][key]
        # 20 source digits per class x 10 classes x 1 copy, in both splits
        assert (result["train_images"], result["eval_images"]) == (200, 200)
        wrong = result["error_pct"] * result["eval_images"] / 100
        assert 0 <= wrong <= 200 and wrong == pytest.approx(round(wrong))  # a count of errors
        assert result["paper_error_pct"] == paper
        assert len(result["history"]["loss"]) == 2 and np.isfinite(result["history"]["loss"]).all()
        assert result["fit_wall_s"] > 0 and result["peak_rss_mib"] > 100
    markdown = (out / "accuracy.md").read_text()
    assert "| model | RTS ours / paper |" in markdown and "/ 0.8 |" in markdown
    for key, result in report["runs"].items():  # each model's predictions, saved
        saved = np.load(out / f"predictions_{key.replace('/', '_')}.npz")
        wrong = saved["predicted"] != saved["label"]
        assert 100 * wrong.mean() == pytest.approx(result["error_pct"])
        assert ("residual_deg" in saved) == (key == "r/st_cnn_affine")
    rotation = report["runs"]["r/st_cnn_affine"]["rotation"]
    assert -1.5 < rotation["slope"] < 1.5 and 0 <= rotation["upright_share"] <= 1
    assert "of the digits back to within 15 degrees of upright" in markdown
    assert "rts" in done.stdout and "st_cnn_affine" in done.stdout
    for variant in ("rts", "r"):
        for picture in ("rectification", "sampling_grid", "training_curves"):
            with Image.open(out / f"{picture}_{variant}.png") as image:
                assert image.format == "PNG" and min(image.size) > 100
