"""The Pusher's executor: a version folder appears under serving/ whole, or not at all."""

import os

import pytest
from tfx.components.pusher import executor as pusher_executor
from tfx.proto import pusher_pb2
from tfx.types import standard_artifacts, standard_component_specs
from tfx.utils import io_utils, path_utils, proto_utils

from components import atomic_pusher
from pipeline.configs import is_version_name


def _push(tmp_path, serving, blessed=1):
    """Run the executor on a model of two files (blessed by the Evaluator, or not); the
    PushedModel artifact."""
    model = standard_artifacts.Model()
    model.uri = str(tmp_path / "model")
    exported = path_utils.serving_model_path(model.uri)
    os.makedirs(os.path.join(exported, "variables"))
    for name in ("saved_model.pb", "variables/variables.index"):
        with open(os.path.join(exported, name), "w") as handle:
            handle.write(name)
    blessings = []
    for kind, value in (
        (standard_artifacts.ModelBlessing, blessed),
        (standard_artifacts.InfraBlessing, 1),
    ):
        blessing = kind()
        blessing.set_int_custom_property("blessed", value)
        blessings.append(blessing)
    pushed = standard_artifacts.PushedModel()
    pushed.uri = str(tmp_path / "pushed")
    destination = pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=str(serving))
    )
    atomic_pusher.Executor().Do(
        {"model": [model], "model_blessing": blessings[:1], "infra_blessing": blessings[1:]},
        {standard_component_specs.PUSHED_MODEL_KEY: [pushed]},
        {standard_component_specs.PUSH_DESTINATION_KEY: proto_utils.proto_to_json(destination)},
    )
    return pushed


def test_a_push_lands_as_a_whole_version_folder(tmp_path):
    serving = tmp_path / "serving" / "stn"
    pushed = _push(tmp_path, serving)
    (version,) = os.listdir(serving)
    assert pushed.get_string_custom_property("pushed_destination") == str(serving / version)
    assert pushed.get_string_custom_property("pushed_version") == version
    assert (serving / version / "saved_model.pb").read_text() == "saved_model.pb"
    assert (serving / version / "variables" / "variables.index").is_file()


def test_a_push_that_fails_midway_leaves_no_version_folder(tmp_path, monkeypatch):
    serving = tmp_path / "serving" / "stn"
    os.makedirs(serving / "7")  # the version being served

    def disk_full(source, destination, overwrite=False):
        # While the copy goes on, serving/ holds no version folder but the served one.
        assert [name for name in os.listdir(serving) if is_version_name(name)] == ["7"]
        with open(destination, "w") as handle:
            handle.write("trunc")  # a truncated saved_model.pb, as a full disk leaves it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_utils, "copy_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _push(tmp_path, serving)
    assert os.listdir(serving) == ["7"]


@pytest.mark.parametrize("served", ["1600000000", "1700000000"])
def test_a_push_gets_a_version_above_every_served_one(tmp_path, monkeypatch, served):
    """A clock that went back (NTP, a skewed node), or a push in the same second, must not
    push at or below the version served: servers serve the highest."""
    serving = tmp_path / "serving" / "stn"
    os.makedirs(serving / served)
    monkeypatch.setattr(pusher_executor.time, "time", lambda: 1600000000.5)
    pushed = _push(tmp_path, serving)
    version = str(int(served) + 1)
    assert sorted(os.listdir(serving), key=int) == [served, version]
    assert pushed.get_string_custom_property("pushed_version") == version
    assert pushed.get_string_custom_property("pushed_destination") == str(serving / version)
    assert (serving / version / "saved_model.pb").read_text() == "saved_model.pb"


def test_the_version_is_raised_above_folders_listed_as_an_object_store_lists_them(monkeypatch):
    listing = ["1700000000/", "notes.txt", ".incoming/"]  # tf.io.gfile.listdir on gs://
    monkeypatch.setattr(atomic_pusher.fileio, "listdir", lambda base: listing)
    assert atomic_pusher._next_version("gs://bucket/serving/stn", 1600000000) == "1700000001"


def test_a_model_that_was_not_blessed_is_not_pushed(tmp_path):
    serving = tmp_path / "serving" / "stn"
    os.makedirs(serving / "7")
    pushed = _push(tmp_path, serving, blessed=0)
    assert pushed.get_int_custom_property("pushed") == 0
    assert not pushed.has_custom_property("pushed_destination")
    assert os.listdir(serving) == ["7"]
