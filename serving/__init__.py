"""tfloop serving: a TensorFlow Serving-compatible HTTP API with dynamic batching, hot swap of model
versions, an upload page and a durable feedback queue. Imports no training, pipeline, mlflow or prefect code.

Entry points: :func:`serving.app.create_app` (the ASGI app for a :class:`serving.settings.ServingSettings`)
and :func:`serving.server.run_server` (uvicorn).
"""
