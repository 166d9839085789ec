#!/usr/bin/env bash
# On a GPU machine with the offline SGLang kit (../shared/sglang-kit): the SGLang report on the built-in model, and
# 10_code_paths' proof against real servers (tests/faults/gpu_code_paths.py: the right sage_attn and triton against
# itself pass, each wrong variant fails its path).
#
#   tools/gpu_check.sh KIT.tar.xz OUT report   # the whole report (params/sglang-builtin-gpu.yaml), in the background, GPU 0
#   tools/gpu_check.sh KIT.tar.xz OUT paths    # the variants at tp 1 (on the last GPU)
#   tools/gpu_check.sh KIT.tar.xz OUT wait     # wait for the report, pack it into OUT/run.tgz
#   tools/gpu_check.sh KIT.tar.xz OUT paths2   # sage_attn, triton and the head-split variant at tp 2 (two GPUs)
set -u
kit=${1:?kit}; out=${2:?out}; phase=${3:?phase}
site=/tmp/sgl-site
[ -f $site/.unpacked ] || { mkdir -p $site && xz -dc "$kit" | tar -x -C $site && touch $site/.unpacked; }
# sagecheck's own entry point (sglang.srt.plugins -> sage_attn) for a checkout that is not pip-installed
meta=/tmp/sagecheck-meta/sagecheck-0.1.0.dist-info
mkdir -p $meta && printf 'Metadata-Version: 2.1\nName: sagecheck\nVersion: 0.1.0\n' > $meta/METADATA \
  && printf '[sglang.srt.plugins]\nsage_attn = sagecheck.sglang_plugin:register\n' > $meta/entry_points.txt
export PYTHONPATH=$site:/tmp/sagecheck-meta:$PWD/lib${PYTHONPATH:+:$PYTHONPATH} JUPYTER_PATH=$site/share/jupyter PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
case $phase in
  report)
    CUDA_VISIBLE_DEVICES=0 setsid python3 -m sagecheck run --params params/sglang-builtin-gpu.yaml --out /tmp/run \
      > /tmp/run.log 2>&1 < /dev/null &
    echo "report started (pid $!)";;
  paths)
    CUDA_VISIBLE_DEVICES=$((gpus - 1)) PYTHONPATH=$PWD/tests/faults/site:$PYTHONPATH \
      python3 tests/faults/gpu_code_paths.py --params params/sglang-builtin-gpu.yaml --out /tmp/cp ${VARIANTS:+--variants $VARIANTS} \
      2>&1 | tee "$out/paths_tp1.md"
    cp /tmp/cp/code_paths_tp1.json "$out/"; tar -C /tmp/cp -czf "$out/paths_logs_tp1.tgz" logs-tp1;;
  wait)
    while pgrep -f "sagecheck run --params" > /dev/null; do sleep 5; done
    cp /tmp/run.log "$out/run.log"
    tar -C /tmp -czf "$out/run.tgz" --exclude='random-model' run && ls -la "$out";;
  paths2)
    PYTHONPATH=$PWD/tests/faults/site:$PYTHONPATH python3 tests/faults/gpu_code_paths.py --params params/sglang-builtin-gpu.yaml \
      --out /tmp/cp --tp 2 --variants sage_attn,triton,sage_attn_head_split 2>&1 | tee "$out/paths_tp2.md"
    cp /tmp/cp/code_paths_tp2.json "$out/"; tar -C /tmp/cp -czf "$out/paths_logs_tp2.tgz" logs-tp2;;
esac
