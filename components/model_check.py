"""ModelCheck: before the push, the model must load in a fresh process and answer a request.

The component runs ``python -m components.model_check MODEL_DIR`` in a new process, which
loads the SavedModel with `tf.saved_model.load` and sends a canned request of encoded images
(a 42 x 42 grey PNG, the default input size; a 28 x 28 RGB PNG; a 42 x 42 JPEG: the
serving signature must bring any of them to the model's size) through ``serving_default``; the
answer must have ``probabilities`` [3, K] float32 rows summing to 1 and ``classes`` [3] int64
equal to their argmax, and ``rectify`` must answer too. The result is an ``InfraBlessing``
artifact (custom property ``blessed`` 1 or 0, ``reason`` in words) that the Pusher requires.
After the Pusher, `PushApproval` writes an ``approval``: a ``ModelBlessing`` of the model
(``blessed`` 1 when the Pusher pushed it, ``current_model_id``), from which the next run's
Resolver takes its baseline, so a model that was never pushed (refused here, or a push that
failed) is never a baseline.

Why not TFX's InfraValidator: it starts a ``tensorflow_model_server`` binary (or a Docker
image of it), and neither exists on these machines. A model the Evaluator did not bless is
not checked (nothing would push it) and gets ``blessed`` 0.
"""

import json
import os
import subprocess
import sys

from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types.standard_artifacts import InfraBlessing, Model, ModelBlessing, PushedModel

CANNED_SIZES = ((42, 42, 1, "png"), (28, 28, 3, "png"), (42, 42, 3, "jpeg"))


@component
def ModelCheck(
    model: InputArtifact[Model],
    model_blessing: InputArtifact[ModelBlessing],
    infra_blessing: OutputArtifact[InfraBlessing],
    timeout_s: Parameter[int] = 300,
):
    """Loads the blessed model in a fresh process and queries ``serving_default``."""
    from tfx.components.util import model_utils
    from tfx.utils import path_utils

    if model_utils.is_model_blessed(model_blessing):
        model_dir = path_utils.serving_model_path(
            model.uri, path_utils.is_old_model_artifact(model)
        )
        passed, reason = check_in_fresh_process(model_dir, timeout_s)
    else:
        passed, reason = False, "not checked: the Evaluator did not bless the model"
    _record(infra_blessing, passed, reason, "INFRA_BLESSED", "INFRA_NOT_BLESSED")


@component
def PushApproval(
    model: InputArtifact[Model],
    pushed_model: InputArtifact[PushedModel],
    approval: OutputArtifact[ModelBlessing],
):
    """Approves the model as the next runs' baseline when, and only when, the Pusher pushed it."""
    pushed = pushed_model.get_int_custom_property("pushed") == 1
    reason = "pushed to serving" if pushed else "not pushed"
    _record(approval, pushed, reason, "BLESSED", "NOT_BLESSED")
    approval.set_int_custom_property("current_model_id", model.id)


def _record(blessing, passed, reason, blessed_marker, not_blessed_marker):
    """Set `blessing`'s ``blessed`` and ``reason`` and write its marker file, as TFX does."""
    blessing.set_int_custom_property("blessed", int(passed))
    blessing.set_string_custom_property("reason", reason)
    os.makedirs(blessing.uri, exist_ok=True)
    with open(
        os.path.join(blessing.uri, blessed_marker if passed else not_blessed_marker), "w"
    ) as f:
        f.write(reason + "\n")


def check_in_fresh_process(model_dir, timeout_s=300):
    """(passed, reason): load `model_dir` in a new Python process and send the canned request."""
    # -P: the installed `components`, not one in the directory the pipeline runs in.
    command = [sys.executable, "-P", "-m", "components.model_check", model_dir]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return False, f"the model did not answer within {timeout_s} s"
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return False, f"the check failed: {lines[-1] if lines else f'exit {done.returncode}'}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return True, f"loaded in a fresh process and answered {result['answered']} canned images"


def canned_request():
    """Encoded images of several sizes, channel counts and formats (a 1-D tf.string tensor)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    encoded = []
    for height, width, channels, kind in CANNED_SIZES:
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        encode = tf.io.encode_png if kind == "png" else tf.io.encode_jpeg
        encoded.append(encode(pixels).numpy())
    return tf.constant(encoded)


def query(model_dir):
    """Load `model_dir`, send the canned request; raise ValueError if an answer is malformed."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(model_dir)
    for name in ("serving_default", "rectify"):
        if name not in loaded.signatures:
            raise ValueError(f"{model_dir} has no {name!r} signature")
    request = canned_request()
    answer = loaded.signatures["serving_default"](images=request)
    probabilities = answer["probabilities"]
    classes = answer["classes"]
    count = int(request.shape[0])
    if probabilities.dtype != tf.float32 or probabilities.shape.rank != 2:
        raise ValueError(f"probabilities must be float32 [B, K], got {probabilities}")
    if probabilities.shape[0] != count or classes.dtype != tf.int64 or classes.shape != [count]:
        raise ValueError(f"expected {count} answers, got {probabilities.shape} / {classes.shape}")
    probabilities = probabilities.numpy()
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(f"probabilities do not sum to 1: {probabilities.sum(axis=1)}")
    if not np.array_equal(classes.numpy(), probabilities.argmax(axis=1)):
        raise ValueError("classes are not the argmax of probabilities")
    rectified = loaded.signatures["rectify"](images=request)["rectified"]
    if rectified.shape[0] != count:
        raise ValueError(f"rectify answered {rectified.shape[0]} images for {count}")
    return {"answered": count, "classes": classes.numpy().tolist()}


def main(argv):
    if len(argv) != 1:
        print("usage: python -m components.model_check MODEL_DIR", file=sys.stderr)
        return 2
    try:
        result = query(argv[0])
    except Exception as error:  # every failure is reported in words on the last line
        words = " ".join(str(error).split())[:500]
        print(f"{type(error).__name__}: {words}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
