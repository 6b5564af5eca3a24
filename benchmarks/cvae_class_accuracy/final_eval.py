"""Evaluate the trained final run (model.pt) with runs.evaluate_model on the quick evaluation."""
import sys, json, os, time
import torch
import genmodels
print("genmodels from", genmodels.__file__, flush=True)
from genmodels.storage import open_storage
from genmodels.data import read_snapshot
from genmodels import runs
root = sys.argv[1]
st = open_storage(root)
snap = read_snapshot(st, "snapshots/fashion-mnist/2316a8d248349dbf")
run = st.child(runs.run_prefix(snap.dataset, "cvae", "quick"))
model, meta = runs.load_model(run)
model.eval()
history = json.loads(run.get_bytes("history.json"))
m = runs.evaluate_model(st, model, snap, "quick")
m["train_seconds"] = sum(h.get("seconds", 0) for h in history)
m["train_epochs"] = len(history)
print(json.dumps(m, indent=1, sort_keys=True), flush=True)
open(os.path.join(root, "final_metrics.json"), "w").write(json.dumps(m, indent=1, sort_keys=True))
