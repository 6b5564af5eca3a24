"""Prefect flows: thin orchestration over `genmodels` (data prep, Ray training, evaluation,
ONNX export, MLflow registration, promotion). Each task calls one `genmodels` function; the
flows only order them, retry what can fail transiently and record inputs and outputs."""
