# Device call 3 (helper-7, repo root): ResNet-20x1 GN B models (pairs 0-2, 60 ep like the A models) and
# ViT x1 A+B (pairs 0-2), 9 processes concurrently; pack checkpoints + logs into $OUT/c3.tar.
# usage: bash .devdata/call3.sh E_GN E_VIT
cd "$(dirname "$0")/.."
EGN=$1; EV=$2
t0=$(date +%s); el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 PYTHONPATH=$PWD FXZIP_CACHE=/root/.cache/fxzip/cifar10
[ -e fxzip/passes ] || ln -s ../passes fxzip/passes
python3 -c "import sys; sys.path.insert(0,'benchmarks'); import cifar_data; d=cifar_data.load_cifar10('.devdata/cifar10-jpeg.tar.gz'); print('decoded', tuple(d.x_train.shape))"
echo "setup done at $(el)s"
R=/tmp/c3; rm -rf $R; mkdir -p $R/logs
C="--device cuda --data .devdata/cifar10-jpeg.tar.gz --no-bar --resume-every 0 --log-every 10"
T=$(( 385 - $(el) ))
for p in 0 1 2; do
  timeout $T python3 benchmarks/train_cifar.py $C --arch resnet20gn --width 1 --pairs $p --models B --epochs $EGN --out $R/cifar10_resnet20gnx1 > $R/logs/gn_p${p}B.log 2>&1 &
  for m in A B; do
    timeout $T python3 benchmarks/train_cifar.py $C --arch vit --width 1 --pairs $p --models $m --epochs $EV --out $R/cifar10_vitx1 > $R/logs/vit_p$p$m.log 2>&1 &
  done
done
sleep 5
while [ $(jobs -r | wc -l) -gt 0 ]; do
  sleep 30; echo "--- t=$(el)s running $(jobs -r | wc -l)"
  for f in $R/logs/*.log; do echo "$(basename $f): $(grep -E ' epoch |\[done\]|Error|BELOW' $f | tail -1)"; done
done
wait
echo "training done at $(el)s"
for f in $R/logs/*.log; do echo "== $f"; tail -n 4 $f; done
cd $R && tar -cf $OUT/c3.tar cifar10_* logs && ls -la $OUT
echo "total $(el)s"
