"""Class judges of more epochs / width: their accuracy on real test images (grey, binarized)
and on a CVAE's conditional samples (decoder means, 1,000 or more class-balanced, seed 0).

    judge3.py STORE MODEL.pt N_SAMPLES 'JSON_OVERRIDES' ...

STORE holds the snapshot (read only: judges are trained here without caching).
"""
import dataclasses, json, sys, time
import numpy as np, torch
from genmodels.storage import open_storage
from genmodels.data import read_snapshot
from genmodels.models import load_checkpoint, model_from_checkpoint
from genmodels.evaluation.classifier import class_judge_config, extract, train_classifier
from genmodels.evaluation.metrics import generate, class_balanced_labels

store, model_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
st = open_storage(store)
snap = read_snapshot(st, "snapshots/fashion-mnist/2316a8d248349dbf")
train, test = snap.splits["train"], snap.splits["test"]
model = model_from_checkpoint(load_checkpoint(open(model_path, "rb").read())).eval()
labels = class_balanced_labels(n, 10)
means = generate(model, n, 0, labels)
for overrides in sys.argv[4:]:
    config = dataclasses.replace(class_judge_config(snap.image), **json.loads(overrides))
    t = time.time()
    net = train_classifier(train.x, train.y, config)
    secs = time.time() - t
    acc = lambda imgs, lab: float(np.mean(extract(net, imgs)[1] == lab))
    pm = extract(net, means)[1]
    pb = extract(net, test.x_binary.astype(np.float32))[1]
    print(json.dumps({"overrides": json.loads(overrides), "train_s": round(secs), "grey_test": acc(test.x, test.y),
                      "bin_test": float(np.mean(pb == test.y)), "cvae_means": float(np.mean(pm == labels.numpy())),
                      "per_class_means": [round(float(np.mean(pm[labels.numpy() == k] == k)), 3) for k in range(10)],
                      "per_class_bin_test": [round(float(np.mean(pb[test.y == k] == k)), 3) for k in range(10)]}),
          flush=True)
