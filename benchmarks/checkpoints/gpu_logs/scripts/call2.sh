# Device call 2 (repo root): HEAD fxzip (+ this tree's zoo.py), then jobs by priority on 3 slots until the deadline:
# x1 BN (pairs 0-3, 100 ep) and x4 (pairs 0-3, 40 ep), the x4 evaluation on CUDA, GN B models, ViT; pack into $OUT.
cd "$(dirname "$0")/.."
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cp fxzip/zoo.py /tmp/zoo_wt.py && rm -rf fxzip passes && tar -xf .devdata/head.tar && cp /tmp/zoo_wt.py fxzip/zoo.py
echo "fxzip: HEAD $(cat .devdata/head.commit) + working-tree zoo.py"
source .devdata/setup.sh
mkdir -p /tmp/c2/logs /tmp/c2/results
echo "setup done at $(el)s"
python3 .devdata/jobs2.py $(( 600 - $(el) - 50 )) > /tmp/jobs2.json
python3 .devdata/sched.py /tmp/jobs2.json 2>&1 | tee /tmp/c2/logs/sched.log
echo "jobs done at $(el)s"
grep -h "\[done\]\|EVAL_SMOKE\|Error" /tmp/c2/logs/*.log | head -60
tail -n 40 /tmp/c2/logs/eval_x4.log
python3 .devdata/pack.py
ls -la $OUT
echo "total $(el)s"
