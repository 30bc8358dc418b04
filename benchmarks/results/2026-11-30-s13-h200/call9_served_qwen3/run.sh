# session 13 call A: expert-GEMM launches of served Qwen3-30B-A3B decode batches (CUDA graphs) and the
# engine's routing, for served_layer_error.py; GPU clocks sampled throughout. GPU0: Marlin + mixed 3.25, GPU1: w4g128 + auto 3.25.
export PYTHONUNBUFFERED=1
. /tmp/vk/env.sh && . benchmarks/gpu_register_plugin.sh
export PYTHONPATH=.:$PYTHONPATH
mkdir -p $OUT/run /tmp/rt
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active --format=csv,noheader -lms 200 > $OUT/run/smi.csv 2>&1 &
SMI=$!
JOBS=
mark() { echo "$(date +%s.%N) $*" >> $OUT/run/phases.txt; }
gpu() {  # gpu variants variant-to-record
  export CUDA_VISIBLE_DEVICES=$1
  mark "gpu$1 profile $2 start"
  OUT=$OUT/run timeout 380 python3 benchmarks/serving_profile.py --variants $2 --batch 1,16,64,256 --tokens 32 --trace > $OUT/run/prof$1.txt 2>&1; echo prof$1 rc $?
  mark "gpu$1 profile end; record start"
  timeout 130 python3 benchmarks/serving_profile.py --variants $3 --batch 1,16,64,256 --tokens 32 --record-routing /tmp/rt/routing_{tag}.pt > $OUT/run/rec_$3.txt 2>&1; echo rec $3 rc $?
  mark "gpu$1 record end"
}
gpu 0 gptq4_marlin,mxmoe_mixed325 mxmoe_mixed325 &
JOBS="$JOBS $!"
gpu 1 mxmoe_w4g128,mxmoe_auto325 mxmoe_auto325 &
JOBS="$JOBS $!"
wait $JOBS
kill $SMI
ls -la /tmp/rt
cp $OUT/run/serving_kernels_*.json /tmp/rt/
python3 benchmarks/served_layer_error.py /tmp/rt --out /tmp/rt > $OUT/run/error.txt 2>&1; echo error rc $?
cp /tmp/rt/routing_counts_*.json /tmp/rt/served_layer_error.* $OUT/run/ 2>/dev/null
cat $OUT/run/error.txt | tail -20
grep -h "^#" $OUT/run/serving_profile_*.txt | cut -c1-160
grep -h "Error\|Traceback\|recorded" $OUT/run/prof*.txt $OUT/run/rec_*.txt | head -20
cp /tmp/rt/routing_counts_*.json $OUT/run/; cd $OUT && tar czf served.tgz run && rm -rf run && ls -la
