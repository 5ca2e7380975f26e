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


@pytest.mark.parametrize(
    "argv", [["--epochs", "0"], ["--copies", "-1"], ["--models", "vgg"], ["--jobs", "0"]]
)
def test_bad_options_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_accuracy.parse_args(argv)
    assert stop.value.code == 2
    assert argv[0] in capsys.readouterr().err


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
    }
    lines = bench_accuracy.goal_lines(results, args)
    assert lines == [
        "- RTS: st_cnn_affine 1.00% vs cnn 2.00%: 50% fewer errors (paper's ST-CNN cut 38%): met",
        "- RTS: st_cnn_affine error 1.00% <= 2.0%: met",
        "- R: st_cnn_tps 1.50% vs cnn 2.00%: 25% fewer errors (paper's ST-CNN cut 42%): NOT met",
        "- E: st_cnn_tps 1.50% vs cnn 2.00%: 25% fewer errors (paper's ST-CNN cut 21%): met",
    ]


@pytest.mark.slow
def test_small_run_writes_tables_json_and_pictures(tmp_path):
    out = tmp_path / "results"
    command = ["benchmarks/bench_accuracy.py", "--small", "--variants", "rts", "r", "--jobs", "2"]
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
    for key, paper in (("rts/cnn", 0.8), ("rts/st_cnn_affine", 0.5)):
        result = report["runs"][key]
        # 20 source digits per class x 10 classes x 1 copy, in both splits
        assert (result["train_images"], result["eval_images"]) == (200, 200)
        wrong = result["error_pct"] * result["eval_images"] / 100
        assert 0 <= wrong <= 200 and wrong == pytest.approx(round(wrong))  # a count of errors
        assert result["paper_error_pct"] == paper
        assert len(result["history"]["loss"]) == 1 and np.isfinite(result["history"]["loss"][0])
        assert result["fit_wall_s"] > 0 and result["peak_rss_mib"] > 100
    markdown = (out / "accuracy.md").read_text()
    assert "| model | RTS ours / paper |" in markdown and "/ 0.8 |" in markdown
    assert "rts" in done.stdout and "st_cnn_affine" in done.stdout
    for variant in ("rts", "r"):
        for picture in ("rectification", "sampling_grid", "training_curves"):
            with Image.open(out / f"{picture}_{variant}.png") as image:
                assert image.format == "PNG" and min(image.size) > 100
