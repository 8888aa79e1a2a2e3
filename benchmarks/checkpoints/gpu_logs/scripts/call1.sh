# Device call 1 (repo root): setup, fxzip CUDA smoke (working tree + HEAD, background), x4 throughput probe,
# a 45 s probe of the training mix, epochs planned from it, then the mix: ResNet-20x1 BN, ResNet-20x1 GN, ViT
# (pairs 0-3, one process per pair, A then B) and MobileNetV2 (pairs 0-1), concurrently; pack into $OUT.
# usage: bash .devdata/call1.sh FALLBACK_E_BN E_GN E_VIT E_MB
cd "$(dirname "$0")/.."
REPO=$PWD
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,timm,torchvision,matplotlib;print('torch',torch.__version__,'timm',timm.__version__,'tv',torchvision.__version__)"
source .devdata/setup.sh
echo "setup done at $(el)s"
( python3 .devdata/smoke_cuda.py
  python3 benchmarks/eval_cifar.py --smoke --device cuda --pairs 0 --holdout-pair 1 --out /tmp/smk/wt --quiet && echo EVAL_SMOKE_WT_OK
  echo "=== HEAD fxzip"
  cd /tmp/head && PYTHONPATH=/tmp/head python3 $REPO/.devdata/smoke_cuda.py
  PYTHONPATH=/tmp/head python3 benchmarks/eval_cifar.py --smoke --device cuda --pairs 0 --holdout-pair 1 --out /tmp/smk/head --quiet && echo EVAL_SMOKE_HEAD_OK
  echo "smoke done at $(el)s" ) > /tmp/smoke.log 2>&1 &
SMK=$!
python3 benchmarks/train_cifar.py --device cuda --width 4 --benchmark 40 --data .devdata/cifar10-jpeg.tar.gz > /tmp/x4_1.json
python3 benchmarks/train_cifar.py --device cuda --width 4 --benchmark 40 --data .devdata/cifar10-jpeg.tar.gz > /tmp/x4c_1.json & P1=$!
python3 benchmarks/train_cifar.py --device cuda --width 4 --benchmark 40 --data .devdata/cifar10-jpeg.tar.gz > /tmp/x4c_2.json & P2=$!
wait $P1 $P2
cat /tmp/x4_1.json; grep -h seconds_per_iteration /tmp/x4c_*.json
echo "x4 probes done at $(el)s"
bash .devdata/mix.sh 1000 1000 1000 100 /tmp/probe_mix 45 1
echo "mix probe done at $(el)s"
for f in /tmp/probe_mix/logs/*.log; do echo "$f: $(grep ' epoch ' $f | tail -1)"; grep -A3 -E "Error|Traceback" $f | head -8; done
T=$(( 560 - $(el) - 20 ))   # trainer timeout: leave ~20 s to pack
B=$(( T - 25 ))             # planned training seconds (start-up and final evaluation inside the margin)
E="$1 $2 $3 $4"
P=$(python3 .devdata/plan.py /tmp/probe_mix/logs $B | tee /dev/stderr | grep ^EPOCHS | cut -d' ' -f2-)
if ! echo "$P" | grep -q None; then E="$P"; fi
echo "PLAN at $(el)s: trainer timeout $T s, budget $B s, epochs bn gn vit mb: $E"
R=/tmp/c1
rm -rf $R
bash .devdata/mix.sh $E $R $T 10
echo "training done at $(el)s"
grep -h "\[done\]" $R/logs/*.log
cp /tmp/smoke.log $R/logs/smoke.log; cp /tmp/x4*.json $R/logs/; cp -r /tmp/probe_mix/logs $R/logs/probe_mix
cd $R && tar -cf /tmp/c1.tar --exclude='*_resume.pt' --exclude='*.tmp' cifar10_* logs && ls -la /tmp/c1.tar
cd /tmp && split -b 15M -d /tmp/c1.tar $OUT/c1.tar.part- && ls -la $OUT
cat /tmp/smoke.log
echo "total $(el)s"
