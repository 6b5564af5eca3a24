"""Prefect flows: thin orchestration over `genmodels` (data prep, Ray training, evaluation,
ONNX export, MLflow registration, promotion). Arrives with the pipelines issue."""
