"""TF Serving's gRPC API (port 8500) on the serving app's event loop: ``tensorflow.serving.PredictionService``
(``Predict``, ``Classify``, ``GetModelMetadata``), ``tensorflow.serving.ModelService`` (``GetModelStatus``),
``grpc.health.v1.Health`` and, when enabled, server reflection.

It shares the REST app's :class:`serving.services.Services`: the same model manager (live and candidate
versions), the same dynamic batcher (a batch may hold images of REST and gRPC requests), the same limits
and the same drain. Image inputs (``image_bytes`` of ``serving_default``, and a ``DT_STRING`` ``images`` on
``predict_images`` as TF Serving's Inception client sends) go through the batcher; other inputs call the
signature directly. Every :class:`serving.errors.ServingError` is answered with the status code of
:data:`STATUS_CODES`; nothing a client sends crashes the server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from serving.errors import (
    FeedbackStoreError,
    ImageRequired,
    InvalidInput,
    ModelNotReady,
    NotFound,
    PayloadTooLarge,
    ServingError,
    Unauthorized,
)
from serving.images import check_image_header
from serving.model import DEFAULT_SIGNATURE, Prediction, ServedModel
from serving.predict import call_signature, predict_image, version_status
from serving.services import Services

logger = logging.getLogger(__name__)

# From the descriptor modules: importing them registers the descriptors reflection serves (the *_grpc stub
# modules alone do not)
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
HEALTH_SERVICE = "grpc.health.v1.Health"
IMAGES_SIGNATURE = "predict_images"
IMAGES_INPUT = "images"
SIGNATURE_DEF_FIELD = "signature_def"
HEALTH_REFRESH_S = 0.5

# One place maps serving's errors to gRPC status codes (the most specific class wins).
STATUS_CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    FeedbackStoreError: grpc.StatusCode.UNAVAILABLE,
    ImageRequired: grpc.StatusCode.FAILED_PRECONDITION,
}
STATES = {
    "START": get_model_status_pb2.ModelVersionStatus.START,
    "LOADING": get_model_status_pb2.ModelVersionStatus.LOADING,
    "AVAILABLE": get_model_status_pb2.ModelVersionStatus.AVAILABLE,
    "UNLOADING": get_model_status_pb2.ModelVersionStatus.UNLOADING,
    "END": get_model_status_pb2.ModelVersionStatus.END,
}
ERROR_CODE_UNKNOWN = 2  # tensorflow.error.Code.UNKNOWN
NUMPY_DTYPES = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
    np.dtype(np.uint8): types_pb2.DT_UINT8,
    np.dtype(np.bool_): types_pb2.DT_BOOL,
}

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


def status_code(error: ServingError) -> grpc.StatusCode:
    """The gRPC status code a serving error is answered with."""
    for kind in type(error).__mro__:
        code = STATUS_CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def rpc(
    method: str, *, counted: bool = False
) -> Callable[[Handler[Request, Response]], Handler[Request, Response]]:
    """Wrap one RPC: errors become status codes, each call is counted (``protocol="grpc"``) and timed;
    ``counted`` calls join the requests in flight that the batcher waits for."""

    def wrap(handler: Handler[Request, Response]) -> Handler[Request, Response]:
        @functools.wraps(handler)
        async def call(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
            services: Services = self.services
            started = time.perf_counter()
            code, message = grpc.StatusCode.OK, ""
            if counted:
                services.in_flight.enter()
            try:
                return await handler(self, request, context)
            except ServingError as error:
                code, message = status_code(error), str(error)
            except Exception:  # the server must answer, never die; logged
                logger.exception("unexpected error in gRPC %s", method)
                code, message = grpc.StatusCode.INTERNAL, "internal error; the server logged the details"
            finally:
                if counted:
                    services.in_flight.leave()
                services.metrics.record_request(
                    "grpc", "POST", method, code.name, time.perf_counter() - started
                )
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises")

        return call

    return wrap


# --- tensors -----------------------------------------------------------------------------------------


def _shape(dims: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
    )


def string_tensor(rows: Sequence[Sequence[str]]) -> tensor_pb2.TensorProto:
    """A ``DT_STRING`` ``[len(rows), k]`` tensor, built without TensorFlow calls."""
    width = len(rows[0]) if rows else 0
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=_shape([len(rows), width]),
        string_val=[value.encode("utf-8") for row in rows for value in row],
    )


def array_tensor(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A TensorProto of a numpy array (numbers as ``tensor_content``, strings as ``string_val``)."""
    if array.dtype == object or array.dtype.kind in "SU":
        values = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
        return tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=_shape(array.shape), string_val=values
        )
    dtype = NUMPY_DTYPES.get(array.dtype)
    if dtype is None:
        array, dtype = array.astype(np.float32), types_pb2.DT_FLOAT
    return tensor_pb2.TensorProto(
        dtype=dtype, tensor_shape=_shape(array.shape), tensor_content=np.ascontiguousarray(array).tobytes()
    )


def prediction_outputs(predictions: Sequence[Prediction]) -> dict[str, tensor_pb2.TensorProto]:
    """The ``serving_default`` outputs of several images, as tensors."""
    return {
        "classes": string_tensor([p.classes for p in predictions]),
        "scores": array_tensor(np.asarray([p.scores for p in predictions], dtype=np.float32)),
        "probabilities": array_tensor(np.asarray([p.probabilities for p in predictions], dtype=np.float32)),
    }


def to_array(tensor: tensor_pb2.TensorProto, *, name: str, numpy_dtype: Any) -> np.ndarray:
    """A request tensor as numpy with the signature's dtype; InvalidInput when it is not one."""
    import tensorflow as tf

    try:
        array = tf.make_ndarray(tensor)
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"input {name!r} is not a valid TensorProto ({error})") from error
    if numpy_dtype is object:
        return array
    if array.dtype == object:
        raise InvalidInput(
            f"input {name!r} must be a numeric tensor ({np.dtype(numpy_dtype).name}), not strings"
        )
    return array.astype(numpy_dtype, copy=False)


# --- services ----------------------------------------------------------------------------------------


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` over the serving app's services."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._signature_maps: weakref.WeakKeyDictionary[ServedModel, Any] = weakref.WeakKeyDictionary()

    @rpc("/tensorflow.serving.PredictionService/Predict", counted=True)
    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        model = resolve(self.services, request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        specs = model.request_specs(signature_name)
        image_input = self._image_input(signature_name, specs, request)
        if image_input is not None:
            check_inputs(request, [image_input])
            tensor = request.inputs[image_input]
            if tensor.dtype != types_pb2.DT_STRING:
                raise InvalidInput(
                    f"input {image_input!r} must be DT_STRING (encoded JPEG/PNG/GIF/BMP images)"
                )
            outputs = await self._predict_images(model, list(tensor.string_val), image_input)
        else:
            outputs = await self._predict_tensors(model, signature_name, specs, request)
        wanted = list(request.output_filter)
        if wanted:
            unknown = [key for key in wanted if key not in outputs]
            if unknown:
                raise InvalidInput(
                    f"output_filter names unknown outputs {unknown}; outputs: {', '.join(sorted(outputs))}"
                )
            outputs = {key: outputs[key] for key in wanted}
        response = predict_pb2.PredictResponse(outputs=outputs)
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature_name
        return response

    def _image_input(
        self, signature_name: str, specs: dict[str, Any], request: predict_pb2.PredictRequest
    ) -> str | None:
        """The input whose image bytes go through the batcher, or None for a direct signature call."""
        if signature_name == DEFAULT_SIGNATURE and len(specs) == 1:
            (name,) = specs
            if next(iter(specs.values())).is_string:
                return name
        if (
            signature_name == IMAGES_SIGNATURE
            and set(request.inputs) == {IMAGES_INPUT}
            and request.inputs[IMAGES_INPUT].dtype == types_pb2.DT_STRING
        ):
            return IMAGES_INPUT
        return None

    async def _predict_images(
        self, model: ServedModel, images: list[bytes], name: str
    ) -> dict[str, tensor_pb2.TensorProto]:
        """The ``serving_default`` outputs of encoded images, each through the dynamic batcher."""
        settings = self.services.settings
        if not images:
            raise InvalidInput(f"input {name!r} holds no image: put the encoded images in string_val")
        if len(images) > settings.max_instances:
            raise PayloadTooLarge(
                f"the request has {len(images)} images, over the limit of {settings.max_instances}; split it"
            )
        headers = []
        for index, image in enumerate(images):
            try:
                headers.append(check_image_header(image, max_pixels=settings.max_image_pixels))
            except ServingError as error:
                raise type(error)(f"{name}[{index}]: {error}") from error
        if len(images) == 1:
            predictions = [
                await predict_image(
                    self.services, model, images[0], where=f"{name}[0]", info=headers[0], protocol="grpc"
                )
            ]
        else:
            predictions = list(
                await asyncio.gather(
                    *(
                        predict_image(
                            self.services, model, image, where=f"{name}[{i}]", info=header, protocol="grpc"
                        )
                        for i, (image, header) in enumerate(zip(images, headers, strict=True))
                    )
                )
            )
        return prediction_outputs(predictions)

    async def _predict_tensors(
        self,
        model: ServedModel,
        signature_name: str,
        specs: dict[str, Any],
        request: predict_pb2.PredictRequest,
    ) -> dict[str, tensor_pb2.TensorProto]:
        check_inputs(request, list(specs))
        services = self.services

        def run() -> dict[str, tensor_pb2.TensorProto]:
            arrays = {
                key: to_array(request.inputs[key], name=key, numpy_dtype=spec.numpy_dtype)
                for key, spec in specs.items()
            }
            outputs = call_signature(services, model, signature_name, arrays)
            return {key: array_tensor(value) for key, value in outputs.items()}

        return await asyncio.to_thread(run)

    @rpc("/tensorflow.serving.PredictionService/Classify", counted=True)
    async def Classify(
        self, request: classification_pb2.ClassificationRequest, context: grpc.aio.ServicerContext
    ) -> classification_pb2.ClassificationResponse:
        model = resolve(self.services, request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature_name != DEFAULT_SIGNATURE:
            model.signature(signature_name)  # InvalidInput for an unknown one
            raise InvalidInput(
                f"Classify maps onto {DEFAULT_SIGNATURE!r} only (tf.Example with the image bytes in feature "
                f"{model.image_input_name()!r}); use Predict for {signature_name!r}"
            )
        kind = request.input.WhichOneof("kind")
        if kind != "example_list":
            raise InvalidInput(
                "Classify takes input.example_list (one tf.Example per image); example_list_with_context "
                "is not supported"
            )
        key = model.image_input_name()
        images: list[bytes] = []
        for index, example in enumerate(request.input.example_list.examples):
            feature = example.features.feature.get(key)
            values = list(feature.bytes_list.value) if feature is not None else []
            if len(values) != 1:
                raise InvalidInput(
                    f"examples[{index}]: needs feature {key!r} with exactly one bytes value "
                    "(the encoded image)"
                )
            images.append(values[0])
        if not images:
            raise InvalidInput("input.example_list holds no example")
        outputs = await self._predict_images(model, images, "examples")
        classes = np.reshape(np.asarray(outputs["classes"].string_val, dtype=object), (len(images), -1))
        scores = np.frombuffer(outputs["scores"].tensor_content, dtype=np.float32).reshape(len(images), -1)
        response = classification_pb2.ClassificationResponse()
        for row_classes, row_scores in zip(classes, scores, strict=True):
            result = response.result.classifications.add()
            for label, score in zip(row_classes, row_scores, strict=True):
                result.classes.add(label=label.decode("utf-8", "replace"), score=float(score))
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature_name
        return response

    async def Regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "Regress: tfloop serves classifiers; use Predict or Classify"
        )

    async def MultiInference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not supported; use Predict")

    @rpc("/tensorflow.serving.PredictionService/GetModelMetadata")
    async def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        fields = list(request.metadata_field)
        if fields != [SIGNATURE_DEF_FIELD]:
            raise InvalidInput(
                f"metadata_field must be [{SIGNATURE_DEF_FIELD!r}] (the only metadata served), got {fields}"
            )
        model = resolve(self.services, request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(self._signature_map(model))
        return response

    def _signature_map(self, model: ServedModel) -> get_model_metadata_pb2.SignatureDefMap:
        signature_map = self._signature_maps.get(model)
        if signature_map is None:
            from google.protobuf import json_format

            signature_map = get_model_metadata_pb2.SignatureDefMap()
            for name, definition in model.signature_def().items():
                json_format.ParseDict(definition, signature_map.signature_def[name])
            self._signature_maps[model] = signature_map
        return signature_map


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: ``GetModelStatus`` (model management is not offered)."""

    def __init__(self, services: Services) -> None:
        self.services = services

    @rpc("/tensorflow.serving.ModelService/GetModelStatus")
    async def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        choice = spec.WhichOneof("version_choice")
        answer = version_status(
            self.services,
            spec.name,
            version=spec.version.value if choice == "version" else None,
            label=spec.version_label if choice == "version_label" else None,
        )
        response = get_model_status_pb2.GetModelStatusResponse()
        for entry in answer["model_version_status"]:
            status = response.model_version_status.add(
                version=int(entry["version"]), state=STATES[entry["state"]]
            )
            if entry["status"]["error_code"] != "OK":
                status.status.error_code = ERROR_CODE_UNKNOWN
                status.status.error_message = entry["status"]["error_message"]
        return response

    async def HandleReloadConfigRequest(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "model configuration is not reloadable: tfloop serves the live and candidate versions "
            "of its model",
        )


def resolve(services: Services, spec: Any) -> ServedModel:
    """The loaded model a ``ModelSpec`` names: ``version`` (Int64Value), ``version_label``, or none (live)."""
    choice = spec.WhichOneof("version_choice")
    return services.manager.resolve(
        spec.name,
        version=spec.version.value if choice == "version" else None,
        label=spec.version_label if choice == "version_label" else None,
    )


def check_inputs(request: predict_pb2.PredictRequest, expected: Sequence[str]) -> None:
    """InvalidInput unless the request's inputs are exactly ``expected`` (TF Serving's rule)."""
    given = set(request.inputs)
    if given != set(expected):
        missing, extra = sorted(set(expected) - given), sorted(given - set(expected))
        parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
        raise InvalidInput(
            f"input keys do not match the signature ({'; '.join(p for p in parts if p)}); "
            f"expected exactly {sorted(expected)}"
        )


class ServingHealth(HealthServicer):
    """``grpc.health.v1.Health``: SERVING while the live version is loaded and the server is not draining,
    NOT_SERVING otherwise; for the server (``""``) and each TF Serving service."""

    SERVICES = ("", PREDICTION_SERVICE, MODEL_SERVICE)

    def __init__(self, services: Services) -> None:
        super().__init__()
        self.services = services

    def current(self) -> int:
        ready = self.services.manager.ready and not self.services.draining
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    async def refresh(self) -> None:
        status = self.current()
        for name in self.SERVICES:
            await self.set(name, status)

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        await self.refresh()  # exact at once; the periodic refresh is for Watch
        return await super().Check(request, context)


class GrpcFrontEnd:
    """The gRPC server of one serving app, on the running event loop (:meth:`start`, :meth:`stop`)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.health = ServingHealth(services)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._refresher: asyncio.Task[None] | None = None

    async def start(self, *, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port) and answer; returns the port. OSError when the
        port cannot be bound."""
        settings = self.services.settings
        limit = settings.max_body_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.services), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.services), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.grpc_reflection:
            from grpc_reflection.v1alpha import reflection

            reflection.enable_server_reflection(
                (PREDICTION_SERVICE, MODEL_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
            )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as error:  # grpcio reports a port it cannot bind so
            raise OSError(f"cannot listen for gRPC on {address}: {error}") from error
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        await server.start()
        await self.health.refresh()
        self.server, self.port = server, bound
        self._refresher = asyncio.create_task(self._refresh_health(), name="grpc-health")
        logger.info("gRPC (TF Serving API) listening on %s", address if port else f"{host}:{bound}")
        return bound

    async def _refresh_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_REFRESH_S)
            await self.health.refresh()

    async def stop(self, *, grace_s: float) -> None:
        """Refuse new calls, let those in progress finish for up to ``grace_s``, then cancel them."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.server = None
