"""Configuration files (`pipeline.configs.load_config`): what a bad value is told apart by.

The pipeline's other configuration tests sit with the end-to-end run, in test_pipeline_e2e.py.
"""

import dataclasses
import json
import os

import pytest

from pipeline.configs import PipelineConfig, load_config
from pipeline.model_repository import ModelRepository


def load_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(str(path))


@pytest.mark.parametrize("name", [field.name for field in dataclasses.fields(PipelineConfig)])
def test_a_wrong_type_names_the_file_and_the_field(tmp_path, name):
    # A list of lists is of no field's type (strings, numbers, flags, mappings, string lists).
    with pytest.raises(ValueError) as error:
        load_yaml(tmp_path, f"{name}: [[1]]\n")
    assert str(error.value).startswith(f"config file {tmp_path / 'config.yaml'}: ")
    assert f"config field {name!r}" in str(error.value)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("name", ["learning_rate", "equivariance_weight"])
def test_numbers_must_be_finite(tmp_path, name, value):
    with pytest.raises(ValueError, match=f"'{name}' must be a finite number"):
        load_yaml(tmp_path, f"{name}: {value}\n")


@pytest.mark.parametrize(
    ("text", "value"), [("1e-3", 1e-3), ("1.0e-3", 1e-3), ("+2.5E+2", 250.0), (".5e-2", 5e-3)]
)
def test_numbers_in_e_notation_are_numbers(tmp_path, text, value):
    assert load_yaml(tmp_path, f"learning_rate: {text}\nepochs: 2\n").learning_rate == value
    with pytest.raises(ValueError, match="'learning_rate' must be a finite number, got inf"):
        load_yaml(tmp_path, "learning_rate: 1e400\n")
    with pytest.raises(ValueError, match=r"'learning_rate' must be a finite number, got '\._e5'"):
        load_yaml(tmp_path, "learning_rate: ._e5\n")  # no digit: a string, as YAML 1.2 reads it


def test_a_seed_tensorflow_refuses_is_refused_before_the_trainer_would(tmp_path):
    import tf_keras as keras

    from stn_model.trainer import TrainingOptions

    with pytest.raises(ValueError, match="config field 'seed' must be >= 0, got -1"):
        load_yaml(tmp_path, "seed: -1\n")
    with pytest.raises(ValueError, match=r"config field 'seed' must be < 2\*\*32"):
        load_yaml(tmp_path, "seed: 4294967296\n")
    with pytest.raises(ValueError, match="Seed must be between 0 and 2"):  # the limit's source
        keras.utils.set_random_seed(2**32)
    with pytest.raises(ValueError, match="seed"):
        TrainingOptions.from_custom_config({"seed": 2**32})
    assert load_yaml(tmp_path, "seed: 4294967295\n").seed == 2**32 - 1


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"epochs: 2\nmodel: \xff\xfe\n")
    with pytest.raises(ValueError, match=rf"^config file {path} is not UTF-8 text"):
        load_config(str(path))


def test_a_key_that_is_no_string_is_an_unknown_field(tmp_path):
    with pytest.raises(ValueError, match=r"config\.yaml: unknown config field\(s\) \[1, 'x'\]"):
        load_yaml(tmp_path, "1: 2\nx: 3\n")


def test_a_key_given_twice_is_refused_not_the_last_one_taken(tmp_path):
    for text in ("epochs: 8\nepochs: 1\n", "multiworker: {num_workers: 2, num_workers: 3}\n"):
        with pytest.raises(ValueError, match=r"not valid YAML(.|\n)*found key '\w+' twice"):
            load_yaml(tmp_path, text)
    # A merge brings in keys that the mapping may set again.
    text = "multiworker:\n  <<: {num_workers: 2, max_restarts: 0}\n  num_workers: 3\n"
    assert load_yaml(tmp_path, text).multiworker == {"num_workers": 3, "max_restarts": 0}


@pytest.mark.parametrize("name", ["data_root", "warm_start_model", "kubeflow_pipeline_root"])
def test_an_empty_path_is_refused_not_taken_for_the_default(tmp_path, name):
    with pytest.raises(ValueError, match=f"config field {name!r} must not be empty"):
        load_yaml(tmp_path, f"{name}: ''\n")
    assert getattr(load_yaml(tmp_path, f"{name}: null\n"), name) is None


REFUSED_MODEL_NAMES = ["..", ".", ".hidden", "a/b", "a\\b", "stn:predict", "a b", "stn?x=1", "é"]


@pytest.mark.parametrize("name", REFUSED_MODEL_NAMES)
def test_run_and_serve_refuse_the_same_model_names(tmp_path, name):
    with pytest.raises(ValueError) as error:
        load_yaml(tmp_path, f"model_name: {json.dumps(name)}\n")  # JSON is YAML
    assert "config.yaml: config field 'model_name' must be" in str(error.value)
    assert str(error.value).endswith(f"got {name!r}")
    with pytest.raises(ValueError, match=r"^model_name must be"):
        ModelRepository(str(tmp_path / "serving"), name)


@pytest.mark.parametrize("name", ["stn", "mnist-st_cnn.v2", "_7"])
def test_run_and_serve_accept_the_same_model_names(tmp_path, name):
    config = load_yaml(tmp_path, f"model_name: {name}\nhome: {tmp_path}\n")
    repository = ModelRepository(os.path.join(config.home_dir, "serving"), name)
    assert repository.model_dir == config.serving_dir == str(tmp_path / "serving" / name)


def test_the_file_and_the_command_line_are_checked_together(tmp_path, capsys):
    from pipeline import cli

    path = tmp_path / "config.yaml"
    path.write_text("multiworker: {mixed_precision: true}\nmodel: st_cnn_affine\n")
    with pytest.raises(ValueError, match=rf"^config file {path}: .*mixed_precision"):
        load_config(str(path))  # one worker: the stock Trainer has no mixed precision
    config = load_config(str(path), multiworker_updates={"num_workers": 2})
    assert config.multiworker == {"mixed_precision": True, "num_workers": 2}
    # An override that makes a good file wrong is not blamed on the file.
    path.write_text("equivariance_weight: 0.5\n")
    with pytest.raises(ValueError, match=r"^config field 'equivariance_weight'") as error:
        load_config(str(path), model="cnn")
    assert str(path) not in str(error.value)
    # A fault of the command line's own is named, not one the command line fixed in the file.
    path.write_text("multiworker: {mixed_precision: true}\n")
    with pytest.raises(ValueError, match=r"^config field 'epochs' must be >= 1, got 0$"):
        load_config(str(path), multiworker_updates={"num_workers": 2}, epochs=0)
    # The command line merges --workers into the file's section the same way.
    path.write_text("multiworker: {mixed_precision: true, max_restarts: 0}\n")
    home = tmp_path / "home"
    argv = ["run", "--config", str(path), "--home", str(home), "--workers", "1"]
    assert cli.main(argv) == 2
    assert f"stn-pipeline run: config file {path}: " in capsys.readouterr().err
    assert not home.exists()


@pytest.mark.parametrize(
    ("command", "more"), [("run", []), ("watch", ["--data-root", "."]), ("report", [])]
)
def test_help_says_a_config_files_home_comes_before_the_default(tmp_path, capsys, command, more):
    from pipeline import cli, run_cmd

    path = tmp_path / "config.yaml"
    path.write_text(f"home: {tmp_path / 'configured'}\n")
    args = cli.build_parser().parse_args([command, "--config", str(path), *more])
    if command == "report":  # as report_cmd.run reads it
        config = load_config(args.config, home=args.home)
    else:
        config = run_cmd.config_from_args(args)
    assert config.home_dir == str(tmp_path / "configured")
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--home HOME output home (default: the config's home, else ./stn_home)" in help_text


def test_a_home_and_data_root_under_tilde_are_the_users_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("home: ~/stn\ndata_root: ~/spans\n")
    config = load_config(str(path))
    assert (config.home_dir, config.data_dir) == (str(tmp_path / "stn"), str(tmp_path / "spans"))
