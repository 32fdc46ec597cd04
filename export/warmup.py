"""TensorFlow Serving warmup records: ``assets.extra/tf_serving_warmup_requests`` made from sample images.

The file is a TFRecord of ``tensorflow.serving.PredictionLog`` messages, each holding one ``PredictRequest``
for the ``serving_default`` signature, so a TensorFlow Serving server (and tfloop's own server) runs the
model once per record before it reports the version as available. The protos come from the
``tensorflow-serving-api`` package when it is installed; otherwise the same bytes are encoded here from
the protobuf wire format (the messages are small and stable), so exporting never needs that package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000

# Field numbers of tensorflow_serving/apis/{prediction_log,predict,model}.proto.
_PREDICTION_LOG_PREDICT_LOG = 6
_PREDICT_LOG_REQUEST = 1
_REQUEST_MODEL_SPEC = 1
_REQUEST_INPUTS = 2
_MODEL_SPEC_NAME = 1
_MODEL_SPEC_SIGNATURE_NAME = 3
_MAP_KEY = 1
_MAP_VALUE = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(len(payload)) + payload


def encode_prediction_log(
    *, model_name: str, signature_name: str, input_name: str, tensor_proto_bytes: bytes
) -> bytes:
    """A serialized ``PredictionLog`` with one ``PredictRequest`` (wire format, no serving protos needed)."""
    model_spec = _length_delimited(_MODEL_SPEC_NAME, model_name.encode()) + _length_delimited(
        _MODEL_SPEC_SIGNATURE_NAME, signature_name.encode()
    )
    map_entry = _length_delimited(_MAP_KEY, input_name.encode()) + _length_delimited(
        _MAP_VALUE, tensor_proto_bytes
    )
    request = _length_delimited(_REQUEST_MODEL_SPEC, model_spec) + _length_delimited(
        _REQUEST_INPUTS, map_entry
    )
    predict_log = _length_delimited(_PREDICT_LOG_REQUEST, request)
    return _length_delimited(_PREDICTION_LOG_PREDICT_LOG, predict_log)


def prediction_log_records(
    images: Sequence[bytes],
    *,
    model_name: str,
    signature_name: str = "serving_default",
    input_name: str = "image_bytes",
) -> list[bytes]:
    """One serialized ``PredictionLog`` per image (a batch of one encoded image each)."""
    import tensorflow as tf

    records = []
    for image in list(images)[:MAX_WARMUP_RECORDS]:
        tensor = tf.make_tensor_proto([image], dtype=tf.string, shape=[1])
        records.append(
            encode_prediction_log(
                model_name=model_name,
                signature_name=signature_name,
                input_name=input_name,
                tensor_proto_bytes=tensor.SerializeToString(),
            )
        )
    return records


def write_warmup_file(
    saved_model_dir: str | os.PathLike[str],
    images: Sequence[bytes],
    *,
    model_name: str,
    signature_name: str = "serving_default",
    input_name: str = "image_bytes",
) -> Path:
    """Write ``<saved_model_dir>/assets.extra/tf_serving_warmup_requests``; returns its path."""
    import tensorflow as tf

    if not images:
        raise ValueError("warmup needs at least one sample image")
    target = Path(saved_model_dir) / WARMUP_DIR / WARMUP_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(target)) as writer:
        for record in prediction_log_records(
            images, model_name=model_name, signature_name=signature_name, input_name=input_name
        ):
            writer.write(record)
    return target


def read_warmup_images(path: str | os.PathLike[str], *, input_name: str = "image_bytes") -> list[bytes]:
    """The encoded images inside a warmup file (parsed with TensorFlow's ``TensorProto``)."""
    import tensorflow as tf

    images: list[bytes] = []
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
        tensor_bytes = _request_input(record, input_name)
        proto = tf.make_tensor_proto([b""])
        proto.ParseFromString(tensor_bytes)
        images.extend(bytes(value) for value in proto.string_val)
    return images


def _fields(message: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of a message (other wire types are skipped)."""
    fields, position = [], 0
    while position < len(message):
        key, position = _read_varint(message, position)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 2:
            length, position = _read_varint(message, position)
            fields.append((field_number, message[position : position + length]))
            position += length
        elif wire_type == 0:
            _, position = _read_varint(message, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
    return fields


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _request_input(prediction_log: bytes, input_name: str) -> bytes:
    for field, predict_log in _fields(prediction_log):
        if field != _PREDICTION_LOG_PREDICT_LOG:
            continue
        for field2, request in _fields(predict_log):
            if field2 != _PREDICT_LOG_REQUEST:
                continue
            for field3, entry in _fields(request):
                if field3 != _REQUEST_INPUTS:
                    continue
                parts = dict(_fields(entry))
                if parts.get(_MAP_KEY, b"").decode() == input_name:
                    return parts.get(_MAP_VALUE, b"")
    raise ValueError(f"warmup record has no input named {input_name!r}")


def synthetic_sample_images(image_size: int, *, count: int = 4) -> list[bytes]:
    """Deterministic JPEG and PNG images (gradients, a checkerboard) for warmup and verification."""
    import numpy as np
    import tensorflow as tf

    size = max(8, int(image_size))
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    horizontal = np.broadcast_to(ramp[None, :, None], (size, size, 3))
    vertical = np.broadcast_to(ramp[:, None, None], (size, size, 3))
    checker = ((np.indices((size, size)).sum(axis=0) // max(1, size // 8)) % 2 * 255)[..., None]
    rng = np.random.default_rng(1234)
    patterns = [
        np.concatenate([horizontal[..., :1], vertical[..., :1], 255 - horizontal[..., :1]], axis=-1),
        np.repeat(checker, 3, axis=-1).astype(np.float32),
        rng.uniform(0, 255, (size, size, 3)).astype(np.float32),
        np.full((size, size, 3), (200, 40, 90), dtype=np.float32),
    ]
    images = []
    for index in range(count):
        pixels = tf.constant(patterns[index % len(patterns)].astype(np.uint8))
        encoded = tf.io.encode_png(pixels) if index % 2 else tf.io.encode_jpeg(pixels, quality=95)
        images.append(bytes(encoded.numpy()))
    return images
