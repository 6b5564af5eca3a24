"""genmodels: deep generative models of images, as software.

The library layer: data, models, training, evaluation, export, sampling, storage.
Nothing here imports Prefect or Ray Serve; `pipelines/` and `serving/` sit on top.
"""

__version__ = "0.1.0"
