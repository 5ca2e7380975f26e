"""TF Serving's REST predict format: JSON request body to input values, outputs to JSON.

Row format: `{"instances": [...]}`, one entry per example: either the value of the single
input (`{"b64": "..."}` for binary data) or an object naming the inputs
(`{"images": {"b64": "..."}}`); answered with `{"predictions": [...]}`, one object per example.
Columnar format: `{"inputs": {"images": [...]}}` or `{"inputs": [...]}` for a single input;
answered with `{"outputs": {...}}`. See https://www.tensorflow.org/tfx/serving/api_rest.
"""

import base64
import binascii
import dataclasses
import json

# A tensor has at most 254 dimensions; TensorFlow aborts the process on a deeper nested list.
MAX_RANK = 254


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status to answer with, plus `headers`."""

    def __init__(self, message, status=400, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclasses.dataclass(frozen=True)
class PredictRequest:
    signature_name: str
    inputs: dict  # input name -> list of values, one per example, base64 already decoded
    row_format: bool


def parse_predict_request(body, input_names_of):
    """Decode a predict request body.

    `input_names_of(signature_name)` returns the input names of that signature, or raises
    RequestError if there is no such signature.
    """
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, too deep, too long
        raise RequestError(f"request body is not valid JSON: {error}") from None
    if not isinstance(request, dict):
        raise RequestError("request body must be a JSON object")
    unknown = set(request) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise RequestError(f"unknown keys in request: {sorted(unknown)}")
    if ("instances" in request) == ("inputs" in request):
        raise RequestError("request must hold exactly one of 'instances' (row format) or 'inputs'")
    signature_name = request.get("signature_name", "serving_default")
    if not isinstance(signature_name, str):
        raise RequestError("'signature_name' must be a string")
    input_names = sorted(input_names_of(signature_name))
    if "instances" in request:
        inputs = _rows_to_inputs(request["instances"], input_names)
    else:
        inputs = _columns_to_inputs(request["inputs"], input_names)
    decoded = {name: _decode_b64(value, name) for name, value in inputs.items()}
    return PredictRequest(signature_name, decoded, "instances" in request)


def format_predict_response(outputs, row_format):
    """`{"predictions": [...]}` (row format) or `{"outputs": ...}` from NumPy output arrays."""
    if not row_format:
        columns = {name: array.tolist() for name, array in outputs.items()}
        return {"outputs": next(iter(columns.values())) if len(columns) == 1 else columns}
    batch_sizes = {name: len(array) for name, array in outputs.items()}
    if len(set(batch_sizes.values())) != 1:
        raise RequestError(f"outputs differ in batch size, cannot form rows: {batch_sizes}", 500)
    rows = [
        {name: array[index].tolist() for name, array in outputs.items()}
        for index in range(next(iter(batch_sizes.values())))
    ]
    if len(outputs) == 1:
        rows = [next(iter(row.values())) for row in rows]
    return {"predictions": rows}


def _is_b64(value):
    return isinstance(value, dict) and set(value) == {"b64"}


def _rows_to_inputs(instances, input_names):
    if not isinstance(instances, list) or not instances:
        raise RequestError("'instances' must be a non-empty list")
    named = [isinstance(row, dict) and not _is_b64(row) for row in instances]
    if not any(named):
        if len(input_names) != 1:
            raise RequestError(f"instances must name the inputs {input_names}")
        return {input_names[0]: instances}
    if not all(named):
        raise RequestError("instances mix named inputs with bare values")
    for index, row in enumerate(instances):
        if sorted(row) != input_names:
            raise RequestError(f"instance {index} has keys {sorted(row)}, expected {input_names}")
    return {name: [row[name] for row in instances] for name in input_names}


def _columns_to_inputs(columns, input_names):
    if not (isinstance(columns, dict) and not _is_b64(columns)):
        if len(input_names) != 1:
            raise RequestError(f"'inputs' must name the inputs {input_names}")
        columns = {input_names[0]: columns}
    if sorted(columns) != input_names:
        raise RequestError(f"'inputs' has keys {sorted(columns)}, expected {input_names}")
    for name, value in columns.items():
        if not isinstance(value, list) or not value:
            raise RequestError(f"input {name!r} must be a non-empty list, one entry per example")
    return columns


def _decode_b64(value, where, rank=1):
    """`value` with every `{"b64": "..."}` replaced by the bytes it encodes; `rank`: the
    tensor rank `value`'s lists reach, here counted from 1, the list of examples."""
    if isinstance(value, list):
        if rank > MAX_RANK:
            raise RequestError(f"{where.split('[')[0]}: values nested deeper than {MAX_RANK} lists")
        return [
            _decode_b64(item, f"{where}[{index}]", rank + 1) for index, item in enumerate(value)
        ]
    if isinstance(value, dict):
        if not _is_b64(value) or not isinstance(value["b64"], str):
            raise RequestError(f'{where}: objects in values must be {{"b64": "<base64>"}}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"{where}: invalid base64: {error}") from None
    return value
