"""Ray Serve application over `genmodels.sampling`: the online sampling API, by layer.

- :mod:`serving.api`: HTTP API v1 (FastAPI), all of it: sampling and bulk job routes, request and
  response schemas with one set of field types, the one error responder.
- :mod:`serving.app`: the Serve deployments (the ``Api`` ingress, which samples too, ``Jobs``,
  and ``Sampler`` where sampling runs apart) and ``build_app`` for ``serve run
  serving/config.yaml``, ``serve deploy`` and ``genmodels serve``.
- :mod:`serving.models` and :mod:`serving.jobs`: the work of the sampling and Jobs replicas,
  plain Python without Serve or HTTP.
- :mod:`serving.errors`: the one error type, :class:`serving.errors.RequestError`.
"""
