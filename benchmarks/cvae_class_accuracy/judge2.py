"""Step 1 figures: the grey-level domain classifier vs the class judge (grey + binarized draws),
on real test images (grey, binarized) and on the CVAE's conditional samples."""
import sys, time, json
import numpy as np, torch
from genmodels.storage import open_storage
from genmodels.data import read_snapshot
from genmodels.models import load_checkpoint, model_from_checkpoint
from genmodels.evaluation.classifier import load_or_train_classifier, class_judge_config, extract
from genmodels.evaluation.metrics import generate, class_balanced_labels
torch.set_num_threads(1)
st = open_storage("/tmp/i10/final")
snap = read_snapshot(st, "snapshots/fashion-mnist/2316a8d248349dbf")
test = snap.splits["test"]
t = time.time()
judge = load_or_train_classifier(snap, st, class_judge_config(snap.image), name="class-judge")
print("judge", round(time.time() - t), "s", judge.key, judge.test_accuracy, judge.test_accuracy_binarized, flush=True)
domain = load_or_train_classifier(snap, st)
nets = {"domain": domain.network, "judge": judge.network}
for path in sys.argv[1:]:
    model = model_from_checkpoint(load_checkpoint(open(path, "rb").read())).eval()
    labels = class_balanced_labels(1000, 10)
    means = generate(model, 1000, 0, labels)
    draws = torch.bernoulli(means, generator=torch.Generator().manual_seed(0))
    for name, net in nets.items():
        acc = lambda imgs, lab: float(np.mean(extract(net, imgs)[1] == lab))
        pm = extract(net, means)[1]
        r = {"model": path, "judge": name, "grey_test": acc(test.x, test.y),
             "bin_test": acc(test.x_binary.astype(np.float32), test.y),
             "bin_test_1k": acc(test.x_binary[:1000].astype(np.float32), test.y[:1000]),
             "cvae_means": float(np.mean(pm == labels.numpy())), "cvae_draws": acc(draws, labels.numpy()),
             "per_class_means": [round(float(np.mean(pm[labels.numpy() == k] == k)), 2) for k in range(10)]}
        print(json.dumps(r), flush=True)
