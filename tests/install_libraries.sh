#!/usr/bin/env bash
# The other libraries the tests patch or compose with (litgpt, torchtitan, torchtune: tests/test_libraries.py;
# Liger-Kernel, TRL: tests/test_liger.py), installed beside the torch, transformers and huggingface-hub already
# there: the first three pin an older torch stack than ours would allow, so they come without their
# dependencies, and their light dependencies under a constraint.
set -euo pipefail
constraints=$(mktemp)
python -m pip freeze | grep -iE '^(torch|transformers|huggingface[-_]hub)==' > "$constraints"
python -m pip install -q --no-deps litgpt==0.5.13 torchtitan==0.2.2 torchtune==0.6.1 torchdata==0.11.0 \
    liger-kernel==0.8.5
python -m pip install -q -c "$constraints" lightning 'jsonargparse[signatures]>=4.37,<=4.41' \
    'torchao<=0.16' tensorboard datasets sentencepiece tiktoken blobfile omegaconf tyro einops trl==1.16.0
rm -f "$constraints"
