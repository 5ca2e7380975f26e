"""The Pusher's executor, with a version folder that appears whole or not at all.

TFX's filesystem Pusher copies the model straight into ``<base>/<version>/``, saved_model.pb
last. A push that fails on the way (a full disk, a killed run) leaves a newer version folder
that does not load, sometimes with a truncated saved_model.pb: model servers try it, and
whatever takes the newest folder for the served model is wrong. This executor lets TFX's copy
go to ``<base>/.incoming/`` (a name no model server reads as a version) and renames the
finished folder into place, so serving sees the new version whole or not at all. The version
is TFX's (the wall clock's seconds) raised above every version already there, so a clock that
went back cannot push a model below the one served. (On an
object store such as gs://, TensorFlow renames a folder object by object: there the window is
narrowed, not closed.)
"""

import os

from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import standard_component_specs
from tfx.utils import proto_utils

from pipeline.configs import is_version_name

STAGING_FOLDER = ".incoming"


class Executor(pusher_executor.Executor):
    """TFX's Pusher executor that stages the copy and renames it into place."""

    def Do(self, input_dict, output_dict, exec_properties):
        key = standard_component_specs.PUSH_DESTINATION_KEY
        destination = proto_utils.json_to_proto(exec_properties[key], pusher_pb2.PushDestination())
        base = destination.filesystem.base_directory
        staging = os.path.join(base, STAGING_FOLDER)
        destination.filesystem.base_directory = staging
        _remove(staging)  # one left by a push that was killed (one run per home at a time)
        try:
            super().Do(
                input_dict,
                output_dict,
                {**exec_properties, key: proto_utils.proto_to_json(destination)},
            )
            (pushed,) = output_dict[standard_component_specs.PUSHED_MODEL_KEY]
            if pushed.get_int_custom_property("pushed") == 1:
                staged = pushed.get_string_custom_property("pushed_version")
                version = _next_version(base, int(staged))
                serving_path = os.path.join(base, version)
                fileio.rename(os.path.join(staging, staged), serving_path)  # never overwrites
                pushed.set_string_custom_property("pushed_version", version)
                pushed.set_string_custom_property("pushed_destination", serving_path)
        finally:
            _remove(staging)


def _next_version(base, stamp):
    """`stamp` (TFX's: the wall clock's seconds), raised above every version folder under
    `base`: model servers serve the highest version, and a clock can go back."""
    names = [name.rstrip("/") for name in fileio.listdir(base)]  # gs:// lists folders as "7/"
    versions = [int(name) for name in names if is_version_name(name)]
    return str(max([stamp, *(version + 1 for version in versions)]))


def _remove(path):
    if fileio.exists(path):
        fileio.rmtree(path)
