"""Baseline for benchmarks/serving_load.py: the server a user would write in 40 lines — one
uvicorn process, FastAPI, the registered version's ONNX graphs in onnxruntime, one call per
request (no batching), the same response (base64 PNG per image, encoded by the same
``image_pngs``) and the same images for the same seed as the platform's API."""

from __future__ import annotations

import argparse
import base64

from pydantic import BaseModel


class Body(BaseModel):  # module level: FastAPI resolves the (string) annotation of the route here
    n: int = 1
    seed: int = 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import uvicorn
    from fastapi import FastAPI

    from genmodels import registry
    from genmodels.images import image_pngs

    registry.configure()
    loaded = registry.load_sampler(args.model, intra_op_num_threads=1)
    sampler = loaded.sampler
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    # async: the graph runs on the event loop, one request at a time, with no thread hop (the
    # cheapest per-request path for a small graph).
    @app.post(f"/v1/models/{args.model}/samples")
    async def samples(body: Body):
        images = sampler.sample(body.n, body.seed, labels=sampler.request_labels(None, body.n))
        return {"model": args.model, "version": loaded.version, "seed": body.seed,
                "images": [base64.b64encode(png).decode("ascii") for png in image_pngs(images)]}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
