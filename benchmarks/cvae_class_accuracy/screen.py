import sys, time, json
import numpy as np, torch
from genmodels.storage import open_storage
from genmodels.data import read_snapshot
from genmodels import runs
from genmodels.evaluation.classifier import load_classifier, extract
from genmodels.evaluation.metrics import generate, class_balanced_labels
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
name, epochs, mo = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
st = open_storage("/tmp/i10/store")
snap = read_snapshot(st, "snapshots/fashion-mnist/2316a8d248349dbf")
out_st = open_storage(f"/tmp/i10/scr/{name}-e{epochs}")
t = time.time()
oc = runs.train_family(out_st, snap, "cvae", "quick", overrides={"epochs": epochs}, model_overrides=mo, fresh=True)
train_s = time.time() - t
model = oc.result.model.eval()
labels = class_balanced_labels(1000, 10)
means = generate(model, 1000, 0, labels)
res = {"name": name, "epochs": epochs, "overrides": mo, "train_s": round(train_s),
       "val_loss": oc.result.history[-1]["val_loss"], "params": sum(p.numel() for p in model.parameters())}
for j, key in (("grey", "classifiers/2316a8d248349dbf.pt"), ("frac0.5", "judges/frac0.5.pt"), ("frac1.0", "judges/frac1.0.pt")):
    if not st.exists(key):
        continue
    net = load_classifier(st.get_bytes(key))[0]
    pm = extract(net, means)[1]
    res[f"acc_{j}"] = float(np.mean(pm == labels.numpy()))
    res[f"pc_{j}"] = [round(float(np.mean(pm[labels.numpy() == k] == k)), 2) for k in range(10)]
test = snap.splits["test"]
torch.manual_seed(0)
xb = torch.from_numpy(test.x_binary[:500]).float(); yb = torch.from_numpy(test.y[:500])
res["nll500_k100"] = float(-model.iwae(xb, yb, k=100).mean())
print(json.dumps(res), flush=True)
open("/tmp/i10/screen.jsonl", "a").write(json.dumps(res) + "\n")
