"""How commands stop on bad paths (an error naming the path, exit 2, nothing written) and Ctrl-C."""

import signal
import subprocess
import sys

import pytest

from pipeline import cli


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a file where a folder should be\n")
    return path


def refused(argv, capsys, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["data", "--out", "{file}"], "--out {file} is not a directory"),
        (["data", "--out", "{file}/spans"], "--out {file}/spans cannot be a directory: {file}"),
        (["run", "--home", "{file}"], "the home {file} is not a directory"),
        (["run", "--home", "{tmp}/h", "--data-root", "{file}"], "data root {file} is not a dir"),
        (["run", "--home", "{tmp}/h", "--data-root", "{tmp}/no"], "data root {tmp}/no does not"),
        (["watch", "--home", "{file}", "--data-root", "{tmp}", "--once"], "the home {file} is not"),
        (["serve", "--home", "{file}", "--port", "0"], "serving/stn cannot be a directory: {file}"),
        (["compile", "--kubeflow", "{file}/p.yaml"], "package's folder {file} is not a directory"),
    ],
)
def test_a_file_in_the_way_of_a_folder_is_named(tmp_path, a_file, capsys, argv, words):
    def fill(text):
        return text.format(file=a_file, tmp=tmp_path)

    refused([fill(arg) for arg in argv], capsys, fill(words))
    assert a_file.read_text() == "a file where a folder should be\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", [["run"], ["watch", "--once", "--data-root", "."]])
def test_a_local_run_refuses_a_uri_home(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    refused([*command, "--home", "gs://bucket/stn"], capsys, "the home gs://bucket/stn is a URI")
    assert list(tmp_path.iterdir()) == []  # no local folder gs:/bucket/stn holding a lock


def test_an_image_size_too_small_for_the_default_data_is_the_config_field(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("image_size: 10\n")
    argv = ["run", "--home", str(tmp_path / "h"), "--config", str(config)]
    words = "config field 'image_size' (the default data's canvas must be at least 28 pixels"
    refused(argv, capsys, words)
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("broken", ["folder", "not sqlite"])
def test_report_names_a_metadata_database_it_cannot_open(tmp_path, capsys, broken):
    database = tmp_path / "metadata.sqlite"
    if broken == "folder":
        database.mkdir()
    else:
        database.write_text("not a database\n" * 100)
    refused(["report", "--home", str(tmp_path)], capsys, f"ML Metadata database {database}")
    assert not (tmp_path / "reports").exists()


def test_an_os_error_no_check_foresaw_is_one_line_not_a_traceback(tmp_path, capsys):
    out = tmp_path / ("x" * 300)  # longer than a file name may be
    assert cli.main(["data", "--out", str(out), "--per-class", "1", "--copies", "1"]) == 1
    err = capsys.readouterr().err
    assert f"stn-pipeline data: {out}" in err and "File name too long" in err
    assert "Traceback" not in err


def test_ctrl_c_stops_a_command_with_a_line_not_a_traceback(tmp_path):
    # Python's own SIGINT handler, which it does not install when its parent ignores SIGINT
    # (a background job of a shell without job control).
    main = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    main += "from pipeline import cli; sys.exit(cli.main())"
    command = [sys.executable, "-c", main, "data", "--out", str(tmp_path / "d")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr.readline().startswith("writing 40000 rts images")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "stn-pipeline data: interrupted"
    assert out == ""  # the finished span's path is printed only when it is whole
    assert "Traceback" not in err
