# usage (repo root, setup sourced): bash .devdata/mix.sh E_BN E_GN E_VIT E_MB OUTROOT TIMEOUT LOGEVERY
E_BN=$1; E_GN=$2; E_VIT=$3; E_MB=$4; R=$5; T=$6; LE=$7
C="--device cuda --data .devdata/cifar10-jpeg.tar.gz --no-bar --resume-every 0 --log-every $LE"
mkdir -p $R/logs
for p in 0 1 2 3; do
  timeout $T python3 benchmarks/train_cifar.py $C --arch resnet20 --width 1 --pairs $p --epochs $E_BN --out $R/cifar10_resnet20x1 > $R/logs/bn_p$p.log 2>&1 &
  timeout $T python3 benchmarks/train_cifar.py $C --arch resnet20gn --width 1 --pairs $p --epochs $E_GN --out $R/cifar10_resnet20gnx1 > $R/logs/gn_p$p.log 2>&1 &
  timeout $T python3 benchmarks/train_cifar.py $C --arch vit --width 1 --pairs $p --epochs $E_VIT --out $R/cifar10_vitx1 > $R/logs/vit_p$p.log 2>&1 &
done
for p in 0 1; do
  timeout $T python3 benchmarks/finetune_mobilenet.py --weights .devdata/mobilenet_v2-b0353104.pth --device cuda --data .devdata/cifar10-jpeg.tar.gz --pairs $p --epochs $E_MB --out $R/cifar10_mobilenetv2_64px > $R/logs/mb_p$p.log 2>&1 &
done
wait
