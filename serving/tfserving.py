"""TensorFlow Serving's REST formats: parse ``:predict`` bodies (row ``instances`` and columnar ``inputs``,
``{"b64": ...}`` binary values) into numpy inputs, and shape model outputs back into the answer.

Parsing is strict and every failure is an :class:`InvalidInput` with a message that names the bad field,
so a malformed request is a 400 and never reaches the model.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from serving.errors import InvalidInput, PayloadTooLarge

Format = Literal["row", "columnar"]


@dataclass(frozen=True)
class InputSpec:
    """What a signature input needs: a string (bytes) tensor or a numeric one of a given shape."""

    is_string: bool
    numpy_dtype: Any
    shape: tuple[int | None, ...] | None


@dataclass(frozen=True)
class ParsedPredict:
    """A decoded ``:predict`` request: its format and one list of per-instance values per input."""

    format: Format
    columns: dict[str, list[Any]]

    @property
    def batch_size(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


def spec_from_tensor_spec(spec: Any) -> InputSpec:
    """An :class:`InputSpec` from a ``tf.TensorSpec``."""
    import tensorflow as tf

    shape = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    is_string = spec.dtype == tf.string
    return InputSpec(is_string, object if is_string else spec.dtype.as_numpy_dtype, shape)


def _decode_binary(value: Any, where: str) -> bytes:
    if isinstance(value, Mapping):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise InvalidInput(f'{where}: a binary value must be {{"b64": "<base64 string>"}}')
        try:  # strict: characters outside the alphabet and bad padding are refused, as validate=True does
            return binascii.a2b_base64(value["b64"], strict_mode=True)
        except (binascii.Error, ValueError) as error:
            raise InvalidInput(f"{where}: the b64 value is not valid base64 ({error})") from error
    if isinstance(value, str):
        return value.encode("utf-8")
    raise InvalidInput(f'{where}: expected a string or {{"b64": ...}}, got {type(value).__name__}')


def parse_predict(
    body: Mapping[str, Any], specs: Mapping[str, InputSpec], *, max_instances: int
) -> ParsedPredict:
    """Decode a TF Serving predict body against the signature's inputs (``specs``)."""
    has_instances, has_inputs = body.get("instances") is not None, body.get("inputs") is not None
    if has_instances == has_inputs:
        raise InvalidInput('the request must have exactly one of "instances" (row) or "inputs" (columnar)')
    names = list(specs)
    if has_instances:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('"instances" must be a non-empty list')
        columns: dict[str, list[Any]] = {name: [] for name in names}
        for index, instance in enumerate(instances):
            named = isinstance(instance, Mapping) and set(instance) != {"b64"}
            if named:
                if set(instance) != set(names):
                    raise InvalidInput(
                        f"instances[{index}]: expected the inputs {names}, got {sorted(map(str, instance))}"
                    )
                for name in names:
                    columns[name].append(instance[name])
            elif len(names) == 1:
                columns[names[0]].append(instance)
            else:
                raise InvalidInput(
                    f"instances[{index}]: this signature has several inputs; name them {names}"
                )
        fmt: Format = "row"
    else:
        inputs = body["inputs"]
        if isinstance(inputs, Mapping) and set(inputs) != {"b64"}:
            if set(inputs) != set(names):
                raise InvalidInput(f'"inputs": expected the inputs {names}, got {sorted(map(str, inputs))}')
            columns = {name: inputs[name] for name in names}
        elif len(names) == 1:
            columns = {names[0]: inputs}
        else:
            raise InvalidInput(f'"inputs": this signature has several inputs; name them {names}')
        for name, values in columns.items():
            if not isinstance(values, list) or not values:
                raise InvalidInput(f'"inputs"["{name}"] must be a non-empty list (one value per instance)')
        if len({len(v) for v in columns.values()}) != 1:
            raise InvalidInput('"inputs": every input needs the same number of instances')
        fmt = "columnar"
    parsed = ParsedPredict(fmt, columns)
    if parsed.batch_size > max_instances:
        raise PayloadTooLarge(
            f"the request has {parsed.batch_size} instances, over the limit of {max_instances}; split it"
        )
    return parsed


def decode_strings(
    values: Sequence[Any], *, name: str, validate: Callable[[bytes, str], None]
) -> list[bytes]:
    """Binary values of one string input, each checked by ``validate(data, where)``."""
    decoded = []
    for index, value in enumerate(values):
        where = f"{name}[{index}]"
        data = _decode_binary(value, where)
        validate(data, where)
        decoded.append(data)
    return decoded


def to_array(values: Sequence[Any], spec: InputSpec, *, name: str) -> np.ndarray:
    """A numeric input as a numpy array of the signature's dtype, its shape checked."""
    try:
        array = np.asarray(values, dtype=spec.numpy_dtype)
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidInput(f"input {name!r}: values are not a regular numeric array ({error})") from error
    if spec.shape is not None:
        expected = spec.shape
        if array.ndim != len(expected) or any(
            want is not None and got != want for got, want in zip(array.shape, expected, strict=True)
        ):
            shown = "x".join("?" if d is None else str(d) for d in expected)
            raise InvalidInput(
                f"input {name!r}: expected shape {shown}, got {'x'.join(map(str, array.shape))}"
            )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r}: values must be finite numbers")
    return array


def _jsonable(array: np.ndarray) -> Any:
    return array.tolist()


def format_outputs(outputs: Mapping[str, np.ndarray], fmt: Format) -> dict[str, Any]:
    """``{"predictions": ...}`` (row) or ``{"outputs": ...}`` (columnar) as TF Serving answers them."""
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": _jsonable(outputs[names[0]])}
        return {"outputs": {name: _jsonable(outputs[name]) for name in names}}
    if len(names) == 1:
        return {"predictions": _jsonable(outputs[names[0]])}
    rows = len(outputs[names[0]])
    return {"predictions": [{name: _jsonable(outputs[name][i]) for name in names} for i in range(rows)]}


def format_rows(rows: Sequence[Mapping[str, Any]], fmt: Format) -> dict[str, Any]:
    """Like :func:`format_outputs`, from one dict of plain JSON values per instance."""
    names = sorted(rows[0])
    if fmt == "columnar":
        columns = {name: [row[name] for row in rows] for name in names}
        return {"outputs": columns[names[0]] if len(names) == 1 else columns}
    if len(names) == 1:
        return {"predictions": [row[names[0]] for row in rows]}
    return {"predictions": [{name: row[name] for name in names} for row in rows]}
