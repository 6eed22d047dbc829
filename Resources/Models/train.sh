#!/usr/bin/env bash
# Retrain the bundled models from scratch on phantom data and copy them into Resources/Models/.
#   Resources/Models/train.sh [NAME ...]          (default: all nine, one after another)
# Training data: 12 phantom subjects from seed 100 (2 mm, 5 % noise); the held-out metrics written
# into each card come from 4 subjects of seed 9001 (`diffusion-mic models evaluate`), which training
# never sees. Each model's settings, including its time limit on a 2-core CPU, are in
# Resources/Models/NAME/train.json. brain-mri-generate-2mm is the generation study's
# diffusion-latent-lesion-map row, trained by a chain of study rows (about 3 h on 2 cores);
# brain-mri-generate-2mm-large is the diffusion-latent-large row, a larger UNet over that row's
# autoencoder (the same chain, then about 1.7 h).
set -euo pipefail
cd "$(dirname "$0")/../.."
DMIC=${DMIC:-.venv/bin/diffusion-mic}
WORK=${WORK:-models-work}
declare -A TASK=([brain-mri-denoise]=denoise [brain-mri-denoise-2d]=denoise [brain-mri-t1t2-to-flair]=translate
                 [brain-mri-lesion-segment]=segment [brain-mri-anomaly]=anomaly [brain-mri-generate]=generate
                 [brain-mri-labels-to-mri]=generate)
# the bundled models that are generation study rows, each trained after the rows its autoencoder comes from
declare -A STUDY_ROW=([brain-mri-generate-2mm]=diffusion-latent-lesion-map [brain-mri-generate-2mm-large]=diffusion-latent-large)
CHAIN=diffusion-latent-long,diffusion-latent-lesion,diffusion-latent-lesion-long,diffusion-latent-lesion-map
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(brain-mri-denoise brain-mri-denoise-2d brain-mri-t1t2-to-flair brain-mri-anomaly brain-mri-lesion-segment brain-mri-generate brain-mri-labels-to-mri brain-mri-generate-2mm brain-mri-generate-2mm-large)
[ -f "$WORK/data/train/dataset.json" ] || "$DMIC" phantom "$WORK/data/train" --subjects 12 --seed 100 --noise 5 --progress none >/dev/null
[ -f "$WORK/data/heldout/dataset.json" ] || "$DMIC" phantom "$WORK/data/heldout" --subjects 4 --seed 9001 --noise 5 --progress none >/dev/null
for name in "${names[@]}"; do
    row=${STUDY_ROW[$name]:-}
    if [ -n "$row" ]; then
        methods=$CHAIN; [ "$row" = diffusion-latent-lesion-map ] || methods=$CHAIN,$row
        "$DMIC" study generate --methods "$methods" --out "$WORK/study" --progress none >/dev/null
        cp "$WORK/study/generate/$row/model/"{model.json,model.safetensors} "Resources/Models/$name/"
        "$DMIC" models evaluate "$name" --data "$WORK/data/heldout" --write --progress none >/dev/null
        continue
    fi
    task=${TASK[$name]:?unknown bundled model $name}
    "$DMIC" train "$task" --data "$WORK/data/train" --out "$WORK/models/$name" --restart \
        --config "Resources/Models/$name/train.json" --progress none
    cp "$WORK/models/$name/model.json" "$WORK/models/$name/model.safetensors" "Resources/Models/$name/"
    "$DMIC" models evaluate "$name" --data "$WORK/data/heldout" --write --progress none >/dev/null
done
