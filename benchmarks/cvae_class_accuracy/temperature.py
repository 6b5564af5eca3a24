"""Class accuracy of a CVAE's samples by the snapshot's cached class judge, at several sampling
temperatures (z = mu_y + sigma_y * temperature * noise): what the API's ``temperature`` buys.

    temperature.py STORE MODEL.pt N_SAMPLES

STORE holds the snapshot and its class judge (``classifiers/<hash16>-class-judge.pt``).
"""
import json, sys
import numpy as np, torch
from genmodels.storage import open_storage
from genmodels.data import read_snapshot
from genmodels.models import load_checkpoint, model_from_checkpoint
from genmodels.evaluation.classifier import load_or_train_classifier, class_judge_config, extract
from genmodels.evaluation.metrics import class_balanced_labels

store, model_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
st = open_storage(store)
snap = read_snapshot(st, "snapshots/fashion-mnist/2316a8d248349dbf")
judge = load_or_train_classifier(snap, st, class_judge_config(snap.image), name="class-judge").network
model = model_from_checkpoint(load_checkpoint(open(model_path, "rb").read())).eval()
labels = class_balanced_labels(n, 10)
asked = labels.numpy()
for temperature in (1.0, 0.9, 0.8, 0.7, 0.5):
    batches = [model.sample(min(256, n - s), labels=labels[s:s + 256], seed=0, start=s, temperature=temperature)
               for s in range(0, n, 256)]
    predicted = extract(judge, torch.cat(batches))[1]
    print(json.dumps({"temperature": temperature, "class_accuracy": float(np.mean(predicted == asked)),
                      "per_class": [round(float(np.mean(predicted[asked == k] == k)), 3) for k in range(10)]}),
          flush=True)
