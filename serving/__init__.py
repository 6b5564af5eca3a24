"""Ray Serve application over `genmodels.sampling`: the online sampling API.

- :mod:`serving.app`: the ``Sampler`` deployment (champions from the MLflow registry, batched
  onnxruntime calls, hot reload) and the ``Api`` ingress; ``build_app(args)`` for
  ``serve run serving/config.yaml``, ``serve deploy`` and ``genmodels serve``.
- :mod:`serving.api`: the FastAPI routes of HTTP API v1, request schemas and JSON errors.
Bulk jobs (``/v1/jobs``) arrive later, as a router included in :func:`serving.api.create_api`.
"""
