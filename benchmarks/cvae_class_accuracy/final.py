"""Final quick run: runs.train_family + runs.evaluate_model (the quick evaluation), as the RESULTS figures."""
import sys, time, json, shutil, os
import torch
from genmodels.storage import open_storage
from genmodels.data import read_snapshot
from genmodels import runs
root = sys.argv[1]
st = open_storage(root)
snap = read_snapshot(st, "snapshots/fashion-mnist/2316a8d248349dbf")
t = time.time()
oc = runs.train_family(st, snap, "cvae", "quick", fresh=True)
train_s = time.time() - t
print("trained", round(train_s), oc.result.history[-1], flush=True)
model = oc.result.model.eval()
t = time.time()
m = runs.evaluate_model(st, model, snap, "quick")
m["train_seconds_wall"] = train_s
m["train_seconds"] = sum(h.get("seconds", 0) for h in oc.result.history)
print(json.dumps(m, indent=1, sort_keys=True), flush=True)
open(os.path.join(root, "final_metrics.json"), "w").write(json.dumps(m, indent=1, sort_keys=True))
