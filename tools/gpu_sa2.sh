#!/usr/bin/env bash
# SageAttention 2 next to 1.0.6 on a Hopper GPU machine with the offline SGLang kit (../shared/sglang-kit): build SA2 from
# a source tree of thu-ml/SageAttention (../shared/sageattention2/build.sh, ~2 min, kept in /tmp/sa2 while the machine
# lives), record which kernel each package's sageattn dispatches to (sagecheck.attention.sage_kernel's probe), and run 00
# and 08 (the kernel notebook) on the built-in GPU preset with each.
#
#   tools/gpu_sa2.sh KIT.tar.xz SA2_SRC BUILD_SH OUT build   # build SA2, probe both, 00+08 with 1.0.6
#   tools/gpu_sa2.sh KIT.tar.xz SA2_SRC BUILD_SH OUT v2      # 00+08 with SA2 (auto, then its Triton FP16 P.V kernel), compare
set -u
kit=${1:?kit}; src=${2:?sa2 source}; build=${3:?build.sh}; out=${4:?out}; phase=${5:?phase}
site=/tmp/sgl-site
[ -f $site/.unpacked ] || { mkdir -p $site && xz -dc "$kit" | tar -x -C $site && touch $site/.unpacked; }
export PYTHONPATH=$site:$PWD/lib JUPYTER_PATH=$site/share/jupyter PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
mkdir -p "$out"
probe() { python3 -c "import json; from sagecheck.attention import sage_kernel as s; print(json.dumps(s.kernel_info(probe=True), indent=1))"; }
sa2() { PYTHONPATH=/tmp/sa2:$PYTHONPATH "$@"; }
case $phase in
  build)
    if [ ! -f /tmp/sa2/.built ]; then
      t0=$(date +%s); bash "$build" "$src" /tmp/sa2 > "$out/build.txt" 2>&1 && touch /tmp/sa2/.built
      echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$out/build.txt"
    fi
    probe > "$out/probe_v1.json" 2>&1; sa2 probe > "$out/probe_v2.json" 2>&1
    python3 -m sagecheck run --params params/builtin-gpu.yaml --only 00,08 --out /tmp/run_v1 -q > "$out/run_v1.log" 2>&1
    tar -C /tmp -czf "$out/run_v1.tgz" run_v1;;
  v2)
    [ -f /tmp/sa2/.built ] || { bash "$build" "$src" /tmp/sa2 > "$out/build.txt" 2>&1 && touch /tmp/sa2/.built; }
    python3 -m sagecheck run --params params/builtin-gpu.yaml --only 00,08 --out /tmp/run_v1 -q > "$out/run_v1.log" 2>&1
    sa2 python3 -m sagecheck run --params params/builtin-gpu.yaml --only 00,08 --out /tmp/run_v2 -q > "$out/run_v2.log" 2>&1
    sa2 python3 -m sagecheck run --params params/builtin-gpu.yaml -p sage_kernel=sageattn_qk_int8_pv_fp16_triton --only 00,08 \
      --out /tmp/run_v2_triton -q > "$out/run_v2_triton.log" 2>&1
    python3 -m sagecheck compare /tmp/run_v1 /tmp/run_v2 /tmp/run_v2_triton --out "$out/compare" > "$out/compare.log" 2>&1
    tar -C /tmp -czf "$out/run_v2.tgz" run_v1 run_v2 run_v2_triton;;
esac
ls -la "$out"
