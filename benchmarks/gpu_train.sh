#!/usr/bin/env bash
# One short GPU session: train the CNN with CUDA (same script as on the CPU), then measure
# ONNX Runtime's GPU providers on the exported network. Usage on the GPU machine, from the
# repository root:  OUT=/some/dir bash benchmarks/gpu_train.sh [SECONDS] [STEPS]
# The checkpoint comes back split in files under 16 MiB: model+meta, and the two Adam moments.
set -u
seconds=${1:-420}
steps=${2:-5000}
width=${3:-16}
hidden=${4:-256}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BCDI_FFT_WORKERS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import onnxruntime as o, torch; print('ort', o.__version__, o.get_available_providers(), 'torch', torch.__version__)"
python3 -m bcdi_bluesky.cli train --device cuda --workers 15 --batch-size 32 --steps "$steps" \
    --width "$width" --hidden "$hidden" --lr 2e-3 --time-limit "$seconds" --validate-every 2500 --checkpoint-every 500 \
    --checkpoints /tmp/ck --quiet 2>&1 | grep -v Warning | tail -5
python3 - <<'PY'
import os, torch
from pathlib import Path
s = torch.load("/tmp/ck/bcdi_cnn64/last.pt", map_location="cpu", weights_only=False)
out = os.environ["OUT"]
# At most 64 MiB come back: a wide network's Adam moments do not fit, and a resumed run
# restarts them (train() accepts a checkpoint without optimizer state).
if sum(t.numel() * t.element_size() for t in s["model"].values()) > 16 * 2**20:
    s.pop("optimizer")
# Files come back only under 16 MiB each: pack the tensors of the checkpoint into parts.
flat, meta = {}, {}
def walk(obj, prefix):
    if isinstance(obj, torch.Tensor) and obj.numel() > 1024:
        flat[prefix] = obj
        return ("__tensor__", prefix)
    if isinstance(obj, dict):
        return {k: walk(v, f"{prefix}/{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [walk(v, f"{prefix}/{i}") for i, v in enumerate(obj)]
    return obj
skeleton = walk(s, "")
parts, part, size = [], {}, 0
for k, t in flat.items():
    b = t.numel() * t.element_size()
    if part and size + b > 14 * 2**20:
        parts.append(part); part, size = {}, 0
    part[k] = t; size += b
parts.append(part)
torch.save(skeleton, f"{out}/ckpt_skeleton.pt")
for i, p in enumerate(parts):
    torch.save(p, f"{out}/ckpt_part{i}.pt")
print("step", s["step"], "elapsed", round(s["elapsed_s"]), "parts", len(parts), "history", s["history"][-2:])
from bcdi_bluesky.model.export import export_onnx
from bcdi_bluesky.model.train import TrainConfig, build_network
net = build_network(TrainConfig.from_checkpoint(s["config"])); net.load_state_dict(s["model"])
export_onnx(net, 64, Path("/tmp/gpu_model.onnx"))
PY
python3 benchmarks/bench_inference.py /tmp/gpu_model.onnx --runs 50 2>&1 | tail -8
