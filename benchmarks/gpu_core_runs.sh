#!/usr/bin/env bash
# The H200 runs behind docs/results_gpu.md (issues: baselines, pruning, tuning, distillation): MiniLM-L6 on
# full SST-2, 3 epochs each, all six in parallel processes on one GPU (their step times are therefore
# shared-GPU numbers; peak memory is per process). Usage on the device (see ../shared/tools/device-pack):
#   source .device/env.sh && bash benchmarks/gpu_core_runs.sh OUT_DIR [DATA_DIR]
set -uo pipefail
out=${1:?output folder}
data=${2:-${APT_DATA_DIR:-../shared/data}/glue/sst2}
mkdir -p "$out/configs"
python - "$out/configs" <<'PY'
import sys, yaml
dst = sys.argv[1]
apt = yaml.safe_load(open("configs/minilm_sst2_apt.yaml"))
apt["trainer"]["callbacks"] = [c for c in apt["trainer"]["callbacks"] if "SelfDistillation" not in c["class_path"]]
yaml.safe_dump(apt, open(f"{dst}/apt_no_distillation.yaml", "w"), sort_keys=False)
PY
declare -A cfg=(
  [ft]=configs/minilm_sst2_ft.yaml [lora]=configs/minilm_sst2_lora.yaml [tuning]=configs/minilm_sst2_tuning.yaml
  [apt]=configs/minilm_sst2_apt.yaml [apt_no_distillation]=$out/configs/apt_no_distillation.yaml
)
for name in "${!cfg[@]}"; do
  python -m apt_lightning.cli fit --config "${cfg[$name]}" --data.init_args.data_dir "$data" \
    --trainer.callbacks+=apt_lightning.callbacks.efficiency.EfficiencyMonitor \
    --trainer.logger.init_args.save_dir "$out" --trainer.logger.init_args.name "$name" \
    --trainer.enable_progress_bar false > "$out/$name.log" 2>&1 &
done
wait
for name in "${!cfg[@]}"; do
  ckpt=$(ls "$out/$name"/version_0/checkpoints/*.ckpt 2>/dev/null | tail -1)
  [ -n "$ckpt" ] && python -m apt_lightning.export "$ckpt" "$out/$name/exported" --overwrite > "$out/$name/export.log" 2>&1
  rm -f "$out/$name"/exported/model.safetensors "$out/$name"/version_0/checkpoints/*.ckpt
done
echo done
