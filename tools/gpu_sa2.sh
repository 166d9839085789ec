#!/usr/bin/env bash
# SageAttention 2 next to 1.0.6 on a Hopper GPU machine with the offline SGLang kit (../shared/sglang-kit). SA2 is built
# from a source tree of thu-ml/SageAttention (../shared/sageattention2/build.sh, ~2 min) into /tmp/sa2, or unpacked from
# the libraries an earlier call brought back (OUT/sa2.tgz, carried as .sa2build/sa2.tgz). `sa2 CMD` runs CMD with SA2
# shadowing the kit's 1.0.6; SGLang servers started from it inherit that path, so sage_attn serves with SA2 (its
# prefill on sageattn, padded per group: SAGE_ATTN_PREFILL=auto).
#
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT check    # SA2's kernel tests, 00+08 with SA2, 08 vs do_bench, code paths with SA2
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT paths    # SA2's kernel tests and the code paths with SA2 only
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT serve8b  # start (in the background) the 8B-shape SGLang run with SA2, then with 1.0.6
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT wait8b   # wait for them (at most ~9 min per call), pack what is there
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT accuracy # 02+03 in SGLang on the built-in model, SA2 and 1.0.6 side by side
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT v2       # 00+08 with 1.0.6, SA2 auto and SA2's Triton kernel, compare
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT census   # 10's paths and kernel census on real servers, 1.0.6 and SA2 side by
#                                                      # side (SA2 compiled meanwhile), then the GPU tests with SA2
#                                                      # (the census during a prefill-graph capture included)
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT speed8b  # sage_attn's per-layer overhead (benchmarks/backend_overhead.py) and
#                                                      # 00+04 on the 8B shape with SA2, the dispatch rule measured
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT builtin35  # the census's cost per call on the GPU, then (in the background)
#                                                      # 00,02,03,04,07 on the built-in model with the dispatch rule
#                                                      # measured, 1.0.6 then SA2, one after the other, and their compare
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT wait35   # wait for them (at most ~9 min per call), pack what is there
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT all35    # (in the background) speed8b's run, then `paths`' code paths with SA2,
#                                                      # then 00,02,03,07 on the built-in model with SA2 and 1.0.6, compared
#                                                      # (GAP=1: `gap`'s measurement first, on its own servers; V1_8B=1:
#                                                      # the 8B run again with 1.0.6, and the two compared)
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT waitgap  # wait for that first step (WAIT_S), bring its tables and traces
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT wait35all # wait for it (WAIT_S, default 540 s), pack what is there
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT gap      # benchmarks/ttft_gap.py on the 8B shape: which part of sage_attn costs
#                                                      # the extra time to first token at 128 x 1 (timed, then profiled;
#                                                      # STEPS=N: each decode step too, GPU clocks logged)
#   tools/gpu_sa2.sh KIT SA2_SRC BUILD_SH OUT quick    # the plugin's GPU tests with SA2 and backend_overhead.py (~1 min)
set -u
kit=${1:?kit}; src=${2:?sa2 source}; build=${3:?build.sh}; out=${4:?out}; phase=${5:?phase}
case $phase in serve8b|builtin35|all35)  # they go on in the background after the call returns, while the next call of the
  # device tool copies the working tree in again: a run that read a file then (07's tokenizer, 2026-12-05) failed. They
  # run from a copy of the tree of their own (the kit and the SA2 build linked, read at the first call only)
  if [ "${SAGECHECK_TREE_COPY:-}" != 1 ]; then
    copy=/tmp/sagecheck-tree; rm -rf $copy; mkdir -p $copy
    tar -C "$PWD" --exclude=./.kit --exclude=./.sa2build --exclude=./.sa2src --exclude=./outputs -cf - . | tar -C $copy -xf -
    for d in .kit .sa2build .sa2src; do [ -e "$d" ] && ln -s "$PWD/$d" "$copy/$d"; done
    case $out in /*) ;; *) out=$PWD/$out;; esac
    cd $copy && SAGECHECK_TREE_COPY=1 exec bash tools/gpu_sa2.sh "$kit" "$src" "$build" "$out" "$phase"
  fi;;
esac
site=/tmp/sgl-site
[ -f $site/.unpacked ] || { mkdir -p $site && xz -dc "$kit" | tar -x -C $site && touch $site/.unpacked; }
meta=/tmp/sagecheck-meta/sagecheck-0.1.0.dist-info  # sagecheck's plugin entry point for a checkout that is not installed
mkdir -p $meta && printf 'Metadata-Version: 2.1\nName: sagecheck\nVersion: 0.1.0\n' > $meta/METADATA \
  && printf '[sglang.srt.plugins]\nsage_attn = sagecheck.sglang_plugin:register\n' > $meta/entry_points.txt
export PYTHONPATH=$site:/tmp/sagecheck-meta:$PWD/lib JUPYTER_PATH=$site/share/jupyter PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
mkdir -p "$out"
sa2() { PYTHONPATH=/tmp/sa2:$PYTHONPATH "$@"; }
ensure_sa2() {
  [ -f /tmp/sa2/.built ] && return
  if [ -f .sa2build/sa2.tgz ]; then mkdir -p /tmp/sa2 && tar -xzf .sa2build/sa2.tgz -C /tmp/sa2 && touch /tmp/sa2/.built; return; fi
  t0=$(date +%s); bash "$build" "$src" /tmp/sa2 > "$out/build.txt" 2>&1 && touch /tmp/sa2/.built
  echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$out/build.txt"
  tar -C /tmp/sa2 -czf "$out/sa2.tgz" --exclude='*.o' --exclude=build sageattention
}
step() { echo "== $(date +%T) $*"; }
large_gpu() { [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 100000 ]; }  # an H200
# the 8B-shape preset whose three servers fit this GPU: the H200's (141 GB), else the one sized for an 80 GB card
preset8b() { if large_gpu; then echo params/sglang-llama8b-random.yaml; else echo params/sglang-llama8b-random-h100.yaml; fi; }
case $phase in
  check|paths)
    ensure_sa2
    step "kernel tests with SA2"; sa2 python3 -m pytest -q -m gpu -s tests/test_sglang_plugin.py -p no:cacheprovider 2>&1 | tail -25
    if [ "$phase" = check ]; then
      step "00+08 with SA2"; sa2 python3 -m sagecheck run --params params/builtin-gpu.yaml --only 00,08 --out /tmp/run_v2 -q > /tmp/run_v2.log 2>&1
      tail -3 /tmp/run_v2.log; python3 -c "import json; d=json.load(open('/tmp/run_v2/results/08_kernel.json')); [print(v['id'], v['passed'], v['value'], v['detail'][:300]) for v in d['verdicts']]"
      step "08 vs do_bench"; sa2 python3 benchmarks/kernel_do_bench.py /tmp/run_v2 --out /tmp/run_v2/do_bench.json
    fi
    step "code paths with SA2"
    PYTHONPATH=$PWD/tests/faults/site:/tmp/sa2:$PYTHONPATH python3 tests/faults/gpu_code_paths.py \
      --params params/sglang-builtin-gpu.yaml --out /tmp/cp \
      --variants sage_attn,sage_attn_prefix_fault,sage_attn_split_own_means,sage_attn_routed,sage_attn_route_miscount \
      2>&1 | tail -60
    grep -h '"kernel"\|"prefill"' /tmp/cp/logs-tp1/*/sage_attn-stats-*/rank*.json 2>/dev/null | sort | uniq
    step "done"
    mkdir -p /tmp/run_v2 && cp -r /tmp/cp /tmp/run_v2/code_paths 2>/dev/null
    tar -C /tmp -czf "$out/$phase.tgz" --exclude='*.safetensors' run_v2 $( [ -f /tmp/run_v2.log ] && echo run_v2.log);;
  serve8b)
    ensure_sa2
    cat > /tmp/serve8b.sh <<EOF
cd $PWD
sa2() { PYTHONPATH=/tmp/sa2:\$PYTHONPATH "\$@"; }
echo "v2 start \$(date +%T)"; sa2 python3 -m sagecheck run --params params/sglang-llama8b-random.yaml --out /tmp/r8b_v2 -q > /tmp/r8b_v2.log 2>&1
echo "v1 start \$(date +%T)"; python3 -m sagecheck run --params params/sglang-llama8b-random.yaml --out /tmp/r8b_v1 -q > /tmp/r8b_v1.log 2>&1
echo "compare \$(date +%T)"; python3 -m sagecheck compare /tmp/r8b_v1 /tmp/r8b_v2 --out /tmp/r8b_compare > /tmp/r8b_compare.log 2>&1
echo "done \$(date +%T)"; touch /tmp/serve8b.done
EOF
    setsid bash /tmp/serve8b.sh > /tmp/serve8b.log 2>&1 < /dev/null &
    echo "started (pid $!)";;
  wait8b)
    t0=$(date +%s)
    while [ ! -f /tmp/serve8b.done ] && [ $(( $(date +%s) - t0 )) -lt ${WAIT_S:-540} ]; do sleep 5; done
    cat /tmp/serve8b.log; tail -2 /tmp/r8b_v2.log /tmp/r8b_v1.log 2>/dev/null
    tar -C /tmp -czf "$out/r8b.tgz" --exclude='random-model' --exclude='*.safetensors' r8b_v2 r8b_v1 r8b_compare \
      r8b_v2.log r8b_v1.log r8b_compare.log serve8b.log 2>/dev/null;;
  accuracy)  # 02 (logits) and 03 (perplexity) in SGLang on the built-in model, SA2 and 1.0.6 side by side (accuracy only)
    ensure_sa2
    sa2 setsid python3 -m sagecheck run --params params/sglang-builtin-gpu.yaml --only 00,02,03 --out /tmp/acc_v2 -q > /tmp/acc_v2.log 2>&1 < /dev/null &
    sleep 30
    setsid python3 -m sagecheck run --params params/sglang-builtin-gpu.yaml --only 00,02,03 --out /tmp/acc_v1 -q > /tmp/acc_v1.log 2>&1 < /dev/null &
    t0=$(date +%s)
    while pgrep -f "sagecheck run --params params/sglang-builtin-gpu.yaml" > /dev/null && [ $(( $(date +%s) - t0 )) -lt ${WAIT_S:-420} ]; do sleep 5; done
    python3 -m sagecheck compare /tmp/acc_v1 /tmp/acc_v2 --out /tmp/acc_compare > /tmp/acc_compare.log 2>&1
    tail -3 /tmp/acc_v1.log /tmp/acc_v2.log; head -30 /tmp/acc_compare/compare.md
    tar -C /tmp -czf "$out/acc.tgz" --exclude='*.safetensors' acc_v1 acc_v2 acc_compare acc_v1.log acc_v2.log acc_compare.log;;
  v2)
    ensure_sa2
    python3 -m sagecheck run --params params/builtin-gpu.yaml --only 00,08 --out /tmp/run_v1 -q > "$out/run_v1.log" 2>&1
    sa2 python3 -m sagecheck run --params params/builtin-gpu.yaml --only 00,08 --out /tmp/run_v2 -q > "$out/run_v2.log" 2>&1
    sa2 python3 -m sagecheck run --params params/builtin-gpu.yaml -p sage_kernel=sageattn_qk_int8_pv_fp16_triton --only 00,08 \
      --out /tmp/run_v2_triton -q > "$out/run_v2_triton.log" 2>&1
    python3 -m sagecheck compare /tmp/run_v1 /tmp/run_v2 /tmp/run_v2_triton --out "$out/compare" > "$out/compare.log" 2>&1
    tar -C /tmp -czf "$out/run_v2.tgz" run_v1 run_v2 run_v2_triton;;
  census)
    ( ensure_sa2 ) > /tmp/sa2build.log 2>&1 &
    bpid=$!
    export PYTHONPATH=$PWD/tests/faults/site:$PYTHONPATH
    step "code paths and census with 1.0.6"
    timeout ${PATHS_S:-400} python3 tests/faults/gpu_code_paths.py --params params/sglang-builtin-gpu.yaml --out /tmp/cp_v1 \
      --variants sage_attn > "$out/paths_v1.md" 2>&1 &
    ppid=$!
    wait $bpid; cat /tmp/sa2build.log; step "SA2 built"
    step "code paths and census with SA2"
    sa2 timeout ${PATHS_S:-400} python3 tests/faults/gpu_code_paths.py --params params/sglang-builtin-gpu.yaml \
      --out /tmp/cp_v2 --variants sage_attn > "$out/paths_v2.md" 2>&1
    wait $ppid; step "paths done"
    tar -C /tmp -czf "$out/census.tgz" --exclude='*.safetensors' cp_v1 cp_v2 2>/dev/null
    sa2 timeout ${TESTS_S:-150} python3 -m pytest -q -m gpu -s tests/test_sglang_plugin_split.py tests/test_sglang_plugin.py \
      tests/test_sglang_plugin_dispatch.py tests/test_cuda_capture.py tests/test_gpu_clocks.py -p no:cacheprovider \
      > "$out/gpu_tests_sa2.txt" 2>&1
    tail -3 "$out/gpu_tests_sa2.txt"
    step "done";;
  speed8b)  # OVERHEAD=0: 00+04 alone, on the preset that fits the GPU (preset8b)
    ensure_sa2
    preset=$(preset8b)
    if [ "${OVERHEAD:-1}" != 0 ]; then
      step "overhead per layer, SA2, 8B shape"
      sa2 python3 benchmarks/backend_overhead.py --out "$out/overhead_sa2.json" > "$out/overhead_sa2.txt" 2>&1; tail -8 "$out/overhead_sa2.txt"
      sa2 python3 benchmarks/backend_overhead.py --shape builtin --out "$out/overhead_sa2_builtin.json" \
        > "$out/overhead_sa2_builtin.txt" 2>&1
    fi
    step "00+04 on the 8B shape ($preset), SA2, dispatch measured"
    sa2 timeout ${RUN_S:-420} python3 -m sagecheck run --params $preset --only 00,04 \
      -p throughput.repeats=${REPEATS:-5} ${EXTRA_P:-} --out /tmp/r8b_v2 -q > /tmp/r8b_v2.log 2>&1
    tail -5 /tmp/r8b_v2.log; step "done"
    tar -C /tmp -czf "$out/r8b.tgz" --exclude='random-model' --exclude='*.safetensors' r8b_v2 r8b_v2.log 2>/dev/null;;
  builtin35)
    ensure_sa2
    step "census cost per call on the GPU"
    python3 benchmarks/census_overhead.py --device cuda --json "$out/census_overhead_cuda.json" 2>&1 | tail -6
    cat > /tmp/b35.sh <<EOF
cd $PWD
sa2() { PYTHONPATH=/tmp/sa2:\$PYTHONPATH "\$@"; }
run() { python3 -m sagecheck run --params params/sglang-builtin-gpu.yaml --only 00,02,03,04,07 \
  -p sglang.sage_attn_dispatch=measured -p throughput.repeats=${REPEATS:-5} --out "\$@"; }
echo "v1 start \$(date +%T)"; run /tmp/b35_v1 -q > /tmp/b35_v1.log 2>&1
echo "v2 start \$(date +%T)"; sa2 run /tmp/b35_v2 -q > /tmp/b35_v2.log 2>&1
echo "compare \$(date +%T)"; python3 -m sagecheck compare /tmp/b35_v1 /tmp/b35_v2 --out /tmp/b35_compare > /tmp/b35_compare.log 2>&1
echo "done \$(date +%T)"; touch /tmp/b35.done
EOF
    setsid bash /tmp/b35.sh > /tmp/b35.log 2>&1 < /dev/null &
    sleep 5; cat /tmp/b35.log;;
  all35)  # in the background, one after the other: the 8B-shape speed run with SA2 (alone on the GPU: its timings), then
          # 10's paths with SA2 and the wrong variants, then 00,02,03,07 on the built-in model with SA2 and 1.0.6 and
          # their compare; `wait35all` waits for it and packs what is there
    ensure_sa2
    preset=$(preset8b)
    echo "8B preset: $preset"
    cat > /tmp/all35.sh <<EOF
cd $PWD
sa2() { PYTHONPATH=/tmp/sa2:\$PYTHONPATH "\$@"; }
mkdir -p /tmp/all35
echo "device-time test \$(date +%T)"; python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_sglang_plugin_dispatch.py \
  > /tmp/all35/device_time_test.txt 2>&1
if [ "${GAP:-0}" = 1 ]; then
  echo "gap start \$(date +%T)"
  RUN_S=${GAP_RUN_S:-420} REPEATS=${GAP_REPEATS:-12} LENGTHS=${GAP_LENGTHS:-128,512,128} PROFILE=${PROFILE:-8} PROFILE_TOKENS=${PROFILE_TOKENS:-1} STEPS=${STEPS:-0} STEP_PROMPTS=${STEP_PROMPTS:-1} \
    GAP_KV=${GAP_KV:-8192} GAP_CHUNK=${GAP_CHUNK:-2048} DECODE_AFTER_S=${DECODE_AFTER_S:-} \
    bash tools/gpu_sa2.sh $kit $src $build /tmp/all35 gap \
    > /tmp/all35/gap-phase.log 2>&1
  touch /tmp/all35/gap.done
fi
echo "overhead \$(date +%T)"; sa2 python3 benchmarks/backend_overhead.py --out /tmp/all35/overhead_sa2.json > /tmp/all35/overhead_sa2.txt 2>&1
echo "8b start \$(date +%T)"; sa2 timeout ${RUN_S:-480} python3 -m sagecheck run --params $preset --only 00,04 \
  -p throughput.repeats=${REPEATS:-12} ${EXTRA_P:-} --out /tmp/all35/r8b_v2 -q > /tmp/all35/r8b_v2.log 2>&1
if [ "${V1_8B:-0}" = 1 ]; then  # the same run with 1.0.6, and the two compared (V1_PREFILL=batched: 1.0.6's sageattn,
  # which sizes nothing from the GPU, instead of its sageattn_varlen, which waits for the GPU in every call)
  echo "8b 1.0.6 start \$(date +%T)"; timeout ${RUN_S:-480} python3 -m sagecheck run --params $preset --only 00,04 \
    -p throughput.repeats=${REPEATS:-12} -p sglang.sage_attn_prefill=${V1_PREFILL:-auto} ${EXTRA_P:-} \
    --out /tmp/all35/r8b_v1 -q > /tmp/all35/r8b_v1.log 2>&1
  python3 -m sagecheck compare /tmp/all35/r8b_v1 /tmp/all35/r8b_v2 --out /tmp/all35/r8b_compare > /tmp/all35/r8b_compare.log 2>&1
fi
echo "paths start \$(date +%T)"; PYTHONPATH=$PWD/tests/faults/site:/tmp/sa2:\$PYTHONPATH timeout 420 python3 tests/faults/gpu_code_paths.py \
  --params params/sglang-builtin-gpu.yaml --out /tmp/all35/cp_v2 \
  --variants sage_attn,sage_attn_split_own_means,sage_attn_routed,sage_attn_route_miscount > /tmp/all35/paths_v2.md 2>&1
echo "accuracy start \$(date +%T)"
sa2 timeout 480 python3 -m sagecheck run --params params/sglang-builtin-gpu.yaml --only 00,02,03,07 --out /tmp/all35/acc_v2 -q > /tmp/all35/acc_v2.log 2>&1 &
sleep 30
timeout 450 python3 -m sagecheck run --params params/sglang-builtin-gpu.yaml --only 00,02,03,07 --out /tmp/all35/acc_v1 -q > /tmp/all35/acc_v1.log 2>&1
wait
python3 -m sagecheck compare /tmp/all35/acc_v1 /tmp/all35/acc_v2 --out /tmp/all35/acc_compare > /tmp/all35/acc_compare.log 2>&1
echo "done \$(date +%T)"; touch /tmp/all35.done
EOF
    setsid bash /tmp/all35.sh > /tmp/all35.log 2>&1 < /dev/null &
    sleep 2; cat /tmp/all35.log;;
  waitgap)  # all35 started with GAP=1: wait for its ttft_gap.py step (WAIT_S), bring its tables and traces back
    t0=$(date +%s)
    while [ ! -f /tmp/all35/gap.done ] && [ $(( $(date +%s) - t0 )) -lt ${WAIT_S:-540} ]; do sleep 5; done
    cat /tmp/all35.log; tail -60 /tmp/all35/gap.md 2>/dev/null
    cp /tmp/all35/gap.json /tmp/all35/gap.md /tmp/all35/gap-logs.tgz /tmp/all35/gap-traces.tar /tmp/all35/gpu-clocks.csv \
      /tmp/all35/steps_by_clock.md /tmp/all35/steps_by_clock.json /tmp/all35/steps_by_clock_nvml.md "$out/" 2>/dev/null;;
  wait35all)
    t0=$(date +%s)
    while [ ! -f /tmp/all35.done ] && [ $(( $(date +%s) - t0 )) -lt ${WAIT_S:-540} ]; do sleep 5; done
    cat /tmp/all35.log; tail -3 /tmp/all35/*.log 2>/dev/null; tail -4 /tmp/all35/overhead_sa2.txt 2>/dev/null
    tar -C /tmp -czf "$out/all35.tgz" --exclude='random-model' --exclude='*.safetensors' --exclude='*.trace.json.gz' \
      all35.log all35 2>/dev/null
    [ -f /tmp/all35/gap.md ] && tail -60 /tmp/all35/gap.md;;  # its logs and traces are in all35.tgz
  gap)  # where sage_attn's extra time to first token at 128 x 1 comes from (benchmarks/ttft_gap.py), 8B shape with a
        # smaller KV cache and prefill graphs up to 2048 tokens: five servers of ~18 GB fit an H200 (GAP_VARIANTS fewer on
        # an 80 GB H100)
    ensure_sa2
    # five servers of ~18 GB on an H200 (141 GB), prefill graphs as its preset; three on an 80 GB H100, prefill graphs up
    # to 2048 tokens as its preset. GAP_KV / GAP_CHUNK: KV tokens and chunked-prefill size per server (8192 / 2048;
    # for decode after an 8192-token prefill: GAP_KV=8400 GAP_CHUNK=8192 LENGTHS=8192 STEPS=48; its probe:
    # GAP_VARIANTS=triton,sage_attn,sage_attn_shadow,sage_attn_release on an H200 (five fit); on an H100 (three fit)
    # triton,sage_attn,sage_attn_shadow, then triton,sage_attn,sage_attn_release; DECODE_AFTER_S=2: the decode of the
    # same prompts again 2 s after their prefill, whether the slower decode outlasts the moments after a kernel prefill,
    # with GAP_VARIANTS=triton,sage_attn,sage_attn_all_triton on an H100, all_triton the control; with STEPS, each step
    # is set against the SM clock logged meanwhile, steps_by_clock.md)
    if large_gpu; then all=triton,triton_copy,sage_attn,sage_attn_all_triton,sage_attn_no_stats; graphs=""
    else all=triton,sage_attn,sage_attn_all_triton; graphs=", --cuda-graph-max-bs-prefill, '2048'"; fi
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
      --format=csv -lms 50 > "$out/gpu-clocks.csv" 2>/dev/null &
    smi=$!
    sa2 timeout ${RUN_S:-540} python3 benchmarks/ttft_gap.py --params params/sglang-llama8b-random.yaml --out "$out/gap.json" \
      --variants ${GAP_VARIANTS:-$all} --repeats ${REPEATS:-12} --profile ${PROFILE:-8} --profile-tokens ${PROFILE_TOKENS:-1} --lengths ${LENGTHS:-128,512,128} \
      --steps ${STEPS:-0} --step-prompts ${STEP_PROMPTS:-1} --decode-after-s "${DECODE_AFTER_S:-}" \
      -p sglang.max_total_tokens=${GAP_KV:-8192} \
      -p "sglang.extra_args=[--sampling-backend, pytorch, --grammar-backend, none, --cuda-graph-max-bs, '32', --chunked-prefill-size, '${GAP_CHUNK:-2048}'$graphs]" \
      2>&1 | grep -v "Ignore import error" | tee "$out/gap.md" | tail -60
    kill $smi 2>/dev/null
    # each decode step against the SM clock logged meanwhile (a slower decode the clock explains, or one at the same clock)
    [ "${STEPS:-0}" != 0 ] && python3 benchmarks/steps_by_clock.py "$out/gap.json" "$out/gpu-clocks.csv" \
      --json "$out/steps_by_clock.json" 2>&1 | tee "$out/steps_by_clock.md" | tail -50
    # the same from the samples ttft_gap.py logged itself through NVML (sagecheck.gpu_clocks, as 04 logs them): the
    # two logs of one run should give the same tables
    [ "${STEPS:-0}" != 0 ] && python3 benchmarks/steps_by_clock.py "$out/gap.json" > "$out/steps_by_clock_nvml.md" 2>&1
    tar -C "$out" -czf "$out/gap-logs.tgz" --exclude='*.trace.json.gz' --exclude='random-model' gap-logs 2>/dev/null
    tar -C "$out" -cf "$out/gap-traces.tar" gap-logs/profiles 2>/dev/null; rm -rf "$out/gap-logs";;
  quick)  # the plugin's GPU tests with SA2 (split, dispatch timing, the census during a capture, the clock log) and
          # the per-layer overhead on the 8B shape (GPU alone)
    ensure_sa2
    step "GPU tests with SA2"; sa2 timeout ${TESTS_S:-120} python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_sglang_plugin_split.py tests/test_sglang_plugin_dispatch.py tests/test_cuda_capture.py \
      tests/test_gpu_clocks.py 2>&1 | tail -4
    step "overhead per layer, SA2, 8B shape"
    sa2 timeout ${OVERHEAD_S:-150} python3 benchmarks/backend_overhead.py --out "$out/overhead_sa2.json" > "$out/overhead_sa2.txt" 2>&1
    grep -v "after, \(device\|host\)" "$out/overhead_sa2.txt" | grep -v Warning | tail -20; step "done";;
  wait35)
    t0=$(date +%s)
    while [ ! -f /tmp/b35.done ] && [ $(( $(date +%s) - t0 )) -lt ${WAIT_S:-540} ]; do sleep 5; done
    cat /tmp/b35.log; tail -2 /tmp/b35_v1.log /tmp/b35_v2.log 2>/dev/null
    tar -C /tmp -czf "$out/b35.tgz" --exclude='*.safetensors' b35_v1 b35_v2 b35_compare b35_v1.log b35_v2.log \
      b35_compare.log b35.log 2>/dev/null;;
esac
ls -la "$out"
