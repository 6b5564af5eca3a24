"""PixelRNN completion cost against the number of unknown pixels (issue 11): the registered
champion's ONNX step graphs (one onnxruntime thread), 16 completions of a 28x28 image, median of 3.

    GENMODELS_WORK_DIR=<work dir of make run> .venv/bin/python benchmarks/completion_cost.py
"""

import statistics, time
import numpy as np
from genmodels import registry
registry.configure()
s = registry.load_sampler("fashion-mnist-pixelrnn", intra_op_num_threads=1).sampler
x = np.zeros((1, 1, 28, 28), np.float32)
s.complete(x, 14, 4, 0)  # warm-up
for k in (1, 7, 14, 21, 27):
    times = []
    for r in range(3):
        t = time.perf_counter(); s.complete(x, k, 16, r); times.append(time.perf_counter() - t)
    print(f"known_rows={k:2d} unknown pixels={(28 - k) * 28:3d}  median {statistics.median(times) * 1e3:7.1f} ms")
