"""Job list of device call 2 (priority order) for sched.py."""
import json
import sys

seconds = int(sys.argv[1])
E1, E4, EGN, EV = 100, 40, 60, 50
C = "python3 benchmarks/train_cifar.py --device cuda --data .devdata/cifar10-jpeg.tar.gz --no-bar --resume-every 0 --log-every 20"
jobs = [{"name": "evalsmoke", "cmd": "python3 benchmarks/eval_cifar.py --smoke --device cuda --pairs 0 --holdout-pair 1 "
         "--out /tmp/c2/smoke/s --quiet && echo EVAL_SMOKE_CUDA_OK", "log": "/tmp/c2/logs/evalsmoke.log", "min_s": 30}]
for p in range(4):
    for m in "AB":
        jobs.append({"name": f"bn_p{p}{m}", "cmd": f"{C} --arch resnet20 --width 1 --pairs {p} --models {m} --epochs {E1} "
                     f"--out /tmp/c2/cifar10_resnet20x1", "log": f"/tmp/c2/logs/bn_p{p}{m}.log", "min_s": 45})
        jobs.append({"name": f"x4_p{p}{m}", "cmd": f"{C} --arch resnet20 --width 4 --pairs {p} --models {m} --epochs {E4}",
                     "log": f"/tmp/c2/logs/x4_p{p}{m}.log", "min_s": 45})
jobs.append({"name": "eval_x4", "after": [f"x4_p{p}{m}" for p in range(4) for m in "AB"], "min_s": 90,
             "cmd": "python3 benchmarks/eval_cifar.py --width 4 --pairs 0 1 2 --holdout-pair 3 --device cuda --threads 6 "
                    "--data .devdata/cifar10-jpeg.tar.gz --cache /tmp/c2/results/x4_cache.json",
             "log": "/tmp/c2/logs/eval_x4.log"})
for p in range(4):
    jobs.append({"name": f"gn_p{p}B", "cmd": f"{C} --arch resnet20gn --width 1 --pairs {p} --models B --epochs {EGN} "
                 f"--out /tmp/c2/cifar10_resnet20gnx1", "log": f"/tmp/c2/logs/gn_p{p}B.log", "min_s": 60})
for p in range(4):
    for m in "AB":
        jobs.append({"name": f"vit_p{p}{m}", "cmd": f"{C} --arch vit --width 1 --pairs {p} --models {m} --epochs {EV} "
                     f"--out /tmp/c2/cifar10_vitx1", "log": f"/tmp/c2/logs/vit_p{p}{m}.log", "min_s": 45})
print(json.dumps({"slots": 3, "seconds": seconds, "jobs": jobs}))
