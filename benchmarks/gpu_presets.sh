#!/usr/bin/env bash
# Train and evaluate presets on a lent GPU machine (no network, the image's own torch) within
# one short window; results land under $OUT. Families run as parallel processes on the one GPU,
# each stopped by --max-minutes after the epoch that crosses it (checkpointed, resumable).
#   usage: benchmarks/gpu_presets.sh MINUTES "cpu:vae,cvae,gan,pixelrnn,mixture full:gan,pixelrnn"
# Needs, carried beside the checkout: .whl/ (pydantic & co. for python 3.12) and
# .data/fashion-mnist/ (the four IDX files).
set -uo pipefail
minutes=$1; plan=$2
runs=()  # preset:family
for entry in $plan; do
  IFS=, read -ra families <<< "${entry#*:}"
  for f in "${families[@]}"; do [[ -n $f ]] && runs+=("${entry%%:*}:$f"); done
done
(( ${#runs[@]} )) || { echo "no preset:family in the plan '$plan'" >&2; exit 2; }
SECONDS=0
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GENMODELS_FASHION_MNIST_DIR=$PWD/.data/fashion-mnist
# Logs gather in one folder and travel as one archive: $OUT returns at most 8 files.
store=/tmp/store; logs=/tmp/gpu_logs; mkdir -p "$OUT" "$logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$logs/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$logs/gpu.txt" 2>&1
# The snapshot and the domain classifier first, once, so the parallel runs share them.
python3 - <<'PY' > "$logs/prep.log" 2>&1 || { cat "$logs/prep.log"; exit 1; }
import time, torch
from genmodels.data import PrepConfig
from genmodels.evaluation.classifier import load_or_train_classifier
from genmodels.runs import snapshot_for
from genmodels.storage import open_storage
t = time.time()
storage = open_storage("file:///tmp/store")
snap = snapshot_for(storage, "fashion-mnist", None, PrepConfig())
clf = load_or_train_classifier(snap, storage, None, torch.device("cuda"))
open("/tmp/snapshot_hash", "w").write(snap.hash)
print("snapshot", snap.hash[:16], "classifier test accuracy", clf.test_accuracy, "seconds", round(time.time() - t, 1))
PY
# The cores shared out: on 2026-12-01 seven runs of torch's default 16 threads each (7x the
# 16 cores) found the small nets host-bound (the full GAN 1,382 images/s).
cores=$(env -u OMP_NUM_THREADS nproc)  # nproc itself answers OMP_NUM_THREADS where it is set
export OMP_NUM_THREADS=$(( cores / ${#runs[@]} > 1 ? cores / ${#runs[@]} : 1 ))
echo "${#runs[@]} runs, $OMP_NUM_THREADS threads each" >> "$logs/prep.log"
for run in "${runs[@]}"; do
  preset=${run%%:*}; f=${run#*:}
  python3 -m genmodels.cli run --families "$f" --preset "$preset" --out "file://$store" \
    --max-minutes "$minutes" > "$logs/$preset-$f.log" 2>&1 &
done
# A hard deadline so whatever finished still comes back inside the machine's window.
deadline=$((SECONDS + ${DEADLINE_S:-540}))
while [ $SECONDS -lt $deadline ] && pgrep -f "genmodels.cli run" >/dev/null; do sleep 5; done
pkill -f "genmodels.cli run" && echo "deadline: runs still going were stopped" >> "$logs/prep.log"
# Reports (tables and comparison pictures) once every family is in, then the small files back.
for entry in $plan; do
  python3 - "${entry%%:*}" <<'PY' >> "$logs/prep.log" 2>&1
import json, sys
from genmodels.runs import collect_metrics, load_snapshot, write_report
from genmodels.storage import open_storage
preset, storage = sys.argv[1], open_storage("file:///tmp/store")
snapshot = load_snapshot(storage, "snapshots/fashion-mnist/" + open("/tmp/snapshot_hash").read().strip()[:16])
report = write_report(storage, snapshot, preset)
rows = collect_metrics(storage, "fashion-mnist", preset, snapshot.hash)
storage.put_bytes(f"reports/fashion-mnist-{preset}.json", json.dumps(rows, indent=1).encode())
print(report.markdown)
PY
done
cd "$store" && tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude='*.onnx' --exclude='snapshots' --exclude='classifiers' . 
find "$store/runs" -name model.pt -size -12M | tar czf "$OUT/models.tgz" -T - 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$logs" .
ls -la "$OUT"
