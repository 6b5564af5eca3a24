"""Baseline for benchmarks/serving_load.py: the naive way to serve a model — one uvicorn
process, torch eager, one request at a time through the model (no batching), same response
format as the real API (base64 PNG per image)."""

from __future__ import annotations

import argparse
import base64
import threading

from pydantic import BaseModel


class Body(BaseModel):  # module level: FastAPI resolves the (string) annotation of the route here
    n: int = 1
    seed: int = 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import torch
    import uvicorn
    from fastapi import FastAPI

    from genmodels.models import model_from_checkpoint
    from serving.api import image_png

    model = model_from_checkpoint(args.checkpoint).eval()
    lock = threading.Lock()  # torch eager, one request at a time: the naive server
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post(f"/v1/models/{args.model}/samples")
    def samples(body: Body):
        labels = torch.arange(body.n) % model.image.num_classes if model.conditional else None
        with lock, torch.no_grad():
            images = model.sample(body.n, labels=labels, seed=body.seed).numpy()
        return {"model": args.model, "seed": body.seed,
                "images": [base64.b64encode(image_png(im)).decode("ascii") for im in images]}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
