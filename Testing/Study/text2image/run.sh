#!/usr/bin/env bash
# Regenerates the text-to-image fine-tuning study (issue 13) committed beside this script:
# table.md, study.png, results.json and base-card.json. Run from the repository root:
#   Testing/Study/text2image/run.sh [WORK_DIR]
# Budget on 2 shared CPU cores: one thread per process (OMP_NUM_THREADS=1), images 32 x 32,
# tiny base, 1200 pre-training steps (+600 VAE), 150 fine-tuning steps per run.
set -euo pipefail
WORK=${1:-study-work}
HERE=$(cd "$(dirname "$0")" && pwd)
DMIC=${DMIC:-.venv/bin/diffusion-mic}
export OMP_NUM_THREADS=1
mkdir -p "$WORK"
# data: 18 training subjects (seed 0) and 4 held-out subjects (seed 9001) of the phantom
$DMIC phantom "$WORK/phantom_train" --subjects 18 --seed 0 --progress none
$DMIC phantom "$WORK/phantom_heldout" --subjects 4 --seed 9001 --progress none
# captioned axial slices: T1, T2, FLAIR for the base; PD (never seen by the base) for fine-tuning
$DMIC text2image slices "$WORK/phantom_train" "$WORK/slices_pretrain" --channels T1,T2,FLAIR --every 1 --progress none
$DMIC text2image slices "$WORK/phantom_train" "$WORK/slices_pd" --channels PD --every 1 --progress none
$DMIC text2image slices "$WORK/phantom_heldout" "$WORK/slices_pd_heldout" --channels PD --every 1 --progress none
$DMIC text2image pretrain --data "$WORK/slices_pretrain" --out "$WORK/base" --max-steps 1200 --size tiny \
    --resolution 32 --batch-size 16 --seed 0 --progress none
$DMIC text2image study --base "$WORK/base" --data "$WORK/slices_pd" --heldout "$WORK/slices_pd_heldout" \
    --sizes 100,500,1000 --prompts "axial PD brain MRI, lower slice" "axial PD brain MRI, middle slice" \
    "axial PD brain MRI, middle slice, with lesion" --token PD --max-steps 150 --count 12 --steps 15 \
    --prior-images 24 --seed 0 --out "$WORK/study" --progress none
cp "$WORK/study/table.md" "$WORK/study/study.png" "$WORK/study/results.json" "$HERE/"
cp "$WORK/base/text2image.json" "$HERE/base-card.json"
