set -x
cd /work/wt/hardneg
export NAPARI_DCA_SHARED=/work/shared OMP_NUM_THREADS=1 PYTHONPATH=/work/wt/hardneg
R=benchmarks/results/hard_negatives_s11
C=${1:-/work/runs/s11/hardneg/glands_hardneg.safetensors}
N=${2:-hardneg}
for o in 0.25 0.125; do
  napari-dca evaluate -c $C --images /work/shared/data/GlaS/train/images --masks /work/shared/data/GlaS/train/masks --split val --threads 1 --overlap $o -o $R/${N}_val_o$o
done
python benchmarks/bench_overlap.py $C --size 1000 --overlaps 0.25,0.125 --threads 1 --out $R/${N}_overlap_1000.md
python benchmarks/look_overlap.py $C train_21 --out $R/${N}_train_21.png
python benchmarks/look_overlap.py $C train_48 --out $R/${N}_train_48.png
for o in 0.25 0.125; do
  python benchmarks/find_false_glands.py $C --split val --overlap $o --size 1000 --min-area 800 --threads 1 --out $R/val_false_${N}_o$o.json
done
python benchmarks/look_overlap.py $C train_5 --out $R/${N}_train_5.png
