"""The distorted-MNIST models of the Spatial Transformer Networks paper (arXiv 1506.02025).

One entry point, `build_model(name, input_shape=(42, 42, 1), num_classes=10)`, with `name` one
of `MODEL_NAMES`. Every model takes float images in [0, 1] of shape `input_shape` (input
layer "images") and returns class probabilities [B, num_classes] (softmax, float32 even
under mixed precision; output layer "probabilities"), so it trains with
`SparseCategoricalCrossentropy()` as is.

Layer sizes follow the paper's Sec. 4.1 and Appendix A.1 ("Distorted MNIST": ReLU units,
softmax classifiers, localization nets ending in the identity-started regression head),
as we read them and as public re-implementations (e.g. hvy/chainer-spatial-transformer-
networks) reproduce them:

| name                | spatial transformer                  | classifier                    |
|---------------------|--------------------------------------|-------------------------------|
| `cnn`               | none                                 | CNN on the input              |
| `st_cnn_affine`     | CNN localization, affine (6)         | CNN on the rectified image    |
| `st_cnn_similarity` | CNN localization, similarity (4)     | CNN on the rectified image    |
| `st_cnn_projective` | CNN localization, projective (8)     | CNN on the rectified image    |
| `st_cnn_tps`        | CNN localization, TPS K x K (2*K*K)  | CNN on the rectified image    |
| `fcn`               | none                                 | FCN on the input              |
| `st_fcn`            | FCN localization, affine (6)         | FCN on the rectified image    |

The paper's Table 1 has no projective or similarity ST-CNN; the similarity transform (turn,
uniform scale, shift) is the one that R and RTS distort by.

- CNN classifier: conv 9x9, 32 filters - max-pool 2x2 - conv 7x7, 32 filters - max-pool 2x2 -
  softmax (convolutions "valid", so it needs at least a 24 x 24 input).
- FCN classifier: 3 fully connected hidden layers of 128 units - softmax.
- CNN localization net: max-pool 2x2 - conv 5x5, 20 filters - max-pool 2x2 - conv 5x5,
  20 filters - max-pool 2x2 (convolutions "same", so any input of at least 8 x 8 works).
- FCN localization net: 3 fully connected layers of 32 units.

Our choice, not the paper's: the transformer of an ST model writes a `st_output_size`
(default 28 x 28) image, whatever the input size. On the 42 x 42 RTS canvas the classifier
then sees a 28 x 28 rectified crop: on R, writing 42 x 42 instead took 1.5 times the CPU
for no fewer errors (docs/accuracy_experiments.md, `--st-output-size 42`). An option, off by
default: `full_resolution_localization=True` drops the CNN localization net's first max-pool (on
elastic digits it gave fewer errors: benchmarks/results/full_resolution_localization/).
Another, also off by default: `st_iterations=N` runs the transformer's localization net N
times, each pass correcting the transform found so far (Lin & Lucey 2017;
`SpatialTransformer`'s `iterations`, where a TPS transformer finds an affine transform in its
first N - 1 passes). And `localization_hidden_units=N` ends the CNN localization net with a
fully connected layer of N units; with the other two options it gave R's lowest error
(benchmarks/results/two_pass_full_resolution_hidden/).

For a trained ST model, `rectifier(model)` gives the sub-model images -> rectified image (what
the classifier sees; the trainer exports it as the `rectify` signature), and
`find_spatial_transformer(model).rectify(images)` gives (rectified, transform parameters,
sampling grid) for plots.
"""

import tf_keras as keras

from stn_model.checks import check_int, check_positive_ints
from stn_model.layers import SpatialTransformer

MODEL_NAMES = (
    "cnn",
    "st_cnn_affine",
    "st_cnn_similarity",
    "st_cnn_projective",
    "st_cnn_tps",
    "fcn",
    "st_fcn",
)
_ST_CNN_TRANSFORMS = {
    "st_cnn_affine": "affine",
    "st_cnn_similarity": "similarity",
    "st_cnn_projective": "projective",
    "st_cnn_tps": "tps",
}
CNN_MIN_SIZE = 24  # 9x9 valid conv, pool, 7x7 valid conv, pool: the smallest side that fits


def cnn_classifier(num_classes):
    """conv 9x9x32 - pool 2 - conv 7x7x32 - pool 2 - softmax (paper, App. A.1), as layers."""
    return [
        keras.layers.Conv2D(32, 9, activation="relu"),
        keras.layers.MaxPool2D(2),
        keras.layers.Conv2D(32, 7, activation="relu"),
        keras.layers.MaxPool2D(2),
        keras.layers.Flatten(),
        _softmax(num_classes),
    ]


def fcn_classifier(num_classes):
    """3 x fully connected 128 - softmax (paper, App. A.1), as layers."""
    return [
        keras.layers.Flatten(),
        *(keras.layers.Dense(128, activation="relu") for _ in range(3)),
        _softmax(num_classes),
    ]


def cnn_localization(name="localization", full_resolution=False, hidden_units=None):
    """pool 2 - conv 5x5x20 - pool 2 - conv 5x5x20 - pool 2 (paper, App. A.1); no head.

    full_resolution=True drops the first pool: the convolutions see the input at full
    resolution, for about 4 times the localization net's compute.
    hidden_units=N ends the net with a fully connected ReLU layer of N units, so the
    transformer's regression head reads N learned features instead of the pooled maps.
    """
    first_pool = [] if full_resolution else [keras.layers.MaxPool2D(2)]
    hidden = (
        []
        if hidden_units is None
        else [keras.layers.Flatten(), keras.layers.Dense(hidden_units, activation="relu")]
    )
    return keras.Sequential(
        [
            *first_pool,
            keras.layers.Conv2D(20, 5, padding="same", activation="relu"),
            keras.layers.MaxPool2D(2),
            keras.layers.Conv2D(20, 5, padding="same", activation="relu"),
            keras.layers.MaxPool2D(2),
            *hidden,
        ],
        name=name,
    )


def fcn_localization(name="localization"):
    """3 x fully connected 32 (paper, App. A.1); no head."""
    return keras.Sequential(
        [
            keras.layers.Flatten(),
            *(keras.layers.Dense(32, activation="relu") for _ in range(3)),
        ],
        name=name,
    )


def _softmax(num_classes):
    # float32 under mixed precision too: the probabilities feed the loss and the export.
    return keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="probabilities"
    )


def build_model(
    name,
    input_shape=(42, 42, 1),
    num_classes=10,
    st_output_size=(28, 28),
    tps_grid_size=4,
    full_resolution_localization=False,
    localization_hidden_units=None,
    st_iterations=1,
):
    """One of the paper's models (see the module docstring), uncompiled.

    input_shape: (height, width, channels) of the float [0, 1] input images.
    num_classes: the width of the softmax output.
    st_output_size: (height, width) the spatial transformer of an ST model writes.
    tps_grid_size: K of the K x K control points of `st_cnn_tps`.
    full_resolution_localization: an ST-CNN's localization net without its first 2x2 pool
      (see `cnn_localization`); ignored by the other models.
    localization_hidden_units: None, or the units of a fully connected ReLU layer at the end
      of an ST-CNN's localization net (see `cnn_localization`); ignored by the other models.
    st_iterations: passes of the transformer (`SpatialTransformer`'s `iterations`); ignored by
      the models without a transformer.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    input_shape = check_positive_ints(input_shape, "input_shape", 3)
    st_output_size = check_positive_ints(st_output_size, "st_output_size", 2)
    num_classes = check_int(num_classes, "num_classes", minimum=2)
    st_iterations = check_int(st_iterations, "st_iterations")
    if localization_hidden_units is not None:
        localization_hidden_units = check_int(
            localization_hidden_units, "localization_hidden_units"
        )
    if name in _ST_CNN_TRANSFORMS:
        # 2x2 pools: three, or two without the first (full_resolution_localization)
        least = 4 if full_resolution_localization else 8
        if min(input_shape[:2]) < least:
            raise ValueError(
                f"input_shape: the ST-CNN's localization net needs images of at least "
                f"{least} x {least}, got {input_shape[:2]}"
            )
    images = keras.Input(input_shape, name="images")
    features = images
    if name in _ST_CNN_TRANSFORMS or name == "st_fcn":
        localization = (
            fcn_localization()
            if name == "st_fcn"
            else cnn_localization(
                full_resolution=full_resolution_localization,
                hidden_units=localization_hidden_units,
            )
        )
        transformer = SpatialTransformer(
            localization,
            st_output_size,
            transform=_ST_CNN_TRANSFORMS.get(name, "affine"),
            tps_grid_size=tps_grid_size,
            iterations=st_iterations,
            name="spatial_transformer",
        )
        features = transformer(images)
    if "cnn" in name:
        side = min(features.shape[1:3])
        if side < CNN_MIN_SIZE:
            argument = "st_output_size" if name != "cnn" else "input_shape"
            raise ValueError(
                f"{argument}: the CNN classifier needs images of at least "
                f"{CNN_MIN_SIZE} x {CNN_MIN_SIZE}, got {tuple(features.shape[1:3])}"
            )
        classifier = cnn_classifier(num_classes)
    else:
        classifier = fcn_classifier(num_classes)
    for layer in classifier:
        features = layer(features)
    return keras.Model(images, features, name=name)


def find_spatial_transformer(model):
    """The one `SpatialTransformer` among `model.layers`; ValueError if there is none or several."""
    found = [layer for layer in model.layers if isinstance(layer, SpatialTransformer)]
    if len(found) != 1:
        raise ValueError(
            f"model {model.name!r} must have exactly one SpatialTransformer layer at its top "
            f"level, found {len(found)}"
        )
    return found[0]


def rectifier(model):
    """The sub-model images -> rectified image of an ST model, or None for a model without one.

    It shares the trained weights of `model`; its output [B, out_h, out_w, C] is what the
    classifier sees. Call it like the model: `rectifier(model)(images, training=False)`.
    """
    if not any(isinstance(layer, SpatialTransformer) for layer in model.layers):
        return None
    transformer = find_spatial_transformer(model)
    return keras.Model(model.inputs, transformer.output, name=f"{model.name}_rectifier")
