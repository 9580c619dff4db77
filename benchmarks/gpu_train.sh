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
s = torch.load("/tmp/ck/bcdi_cnn64/last.pt", map_location="cpu", weights_only=False)
opt = s.pop("optimizer")
out = os.environ["OUT"]
torch.save(s, f"{out}/ckpt_main.pt")
st = opt["state"]
torch.save({"param_groups": opt["param_groups"],
            "state": {k: {"step": v["step"], "exp_avg": v["exp_avg"]} for k, v in st.items()}},
           f"{out}/ckpt_opt_a.pt")
torch.save({k: v["exp_avg_sq"] for k, v in st.items()}, f"{out}/ckpt_opt_b.pt")
print("step", s["step"], "elapsed", round(s["elapsed_s"]), "history", s["history"][-2:])
from bcdi_bluesky.model.export import export_onnx
from bcdi_bluesky.model.train import TrainConfig, build_network
net = build_network(TrainConfig(**s["config"])); net.load_state_dict(s["model"])
from pathlib import Path
export_onnx(net, 64, Path("/tmp/gpu_model.onnx"))
PY
python3 benchmarks/bench_gpu_inference.py /tmp/gpu_model.onnx --runs 50 2>&1 | tail -8
