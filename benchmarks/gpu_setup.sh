# Source on the GPU machine (no network): installs the carried wheels (.whl) and this package.
# Usage (from the repo root): source benchmarks/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip-colt5.log 2>&1 || cat /tmp/pip-colt5.log
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton, colt5.kernels; print('gpu setup:', torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPU(s)')"
