"""The MLflow pyfunc of a registered genmodels sampler, logged as *model code*: MLflow runs this
file when it loads the model, so loading never unpickles anything.

``predict(model_input, params)``: ``model_input`` holds the noise fields of the model
(``genmodels.noise``; float32 [n, ...]) and, for conditional models, ``labels`` (int64 [n]);
``params={"temperature": t}``. Returns the images, float32 [n, C, H, W] on the model's
quantization grid or in [0, 1]. The ONNX graphs are the model's artifacts; the sampler runtime
(``genmodels.sampling``) drives them, so the images are those of torch and of the serving API.
"""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# The model's signature is explicit (tensor specs logged with it); MLflow still asks, on every
# log and load, for predict() type hints, which cannot express named tensors.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


class OnnxSamplerModel(PythonModel):
    def load_context(self, context) -> None:
        from genmodels.sampling import OnnxSampler

        self.sampler = OnnxSampler(sorted(context.artifacts.values()))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a schema from them
        columns = model_input if isinstance(model_input, dict) else {c: np.stack(model_input[c].to_numpy())
                                                                      for c in model_input.columns}
        noise = {name: np.asarray(columns[name], np.float32) for name in self.sampler.noise_spec}
        labels = columns.get("labels")
        temperature = float((params or {}).get("temperature", 1.0))
        return self.sampler.sample_from_noise(noise, None if labels is None else np.asarray(labels), temperature)


mlflow.models.set_model(OnnxSamplerModel())
