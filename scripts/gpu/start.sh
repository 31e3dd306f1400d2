#!/usr/bin/env bash
# On the GPU machine, second staging call: join the GGUF parts, install carried wheels, copy the repo,
# start all.sh detached (it outlives this call while the machine stays warm), then monitor.
set -eu
cat /root/stage/smol.part00 .stage/p1/smol.part01 > /root/stage/model.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/stage/model.gguf" | sha256sum -c
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
rm -rf /root/work/repo && mkdir -p /root/work/repo
tar --exclude=./.stage --exclude=./.whl --exclude=./.data -cf - . | tar -xf - -C /root/work/repo
echo "$FLATQUANT_GIT_COMMIT" > /root/work/commit
FLATQUANT_GIT_COMMIT=$FLATQUANT_GIT_COMMIT STEPS="${STEPS:-}" \
  setsid nohup bash /root/work/repo/scripts/gpu/all.sh > /root/work/all.log 2>&1 < /dev/null &
sleep 2
bash scripts/gpu/monitor.sh "${1:-480}"
