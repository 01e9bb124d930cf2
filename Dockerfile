# The sandbox image: the runner (`python -m sandbox.runner`) and what it imports, nothing of the server.
#
# Build it with `lemur-agent-server sandbox build` (or `python -m sandbox.image`), not with a bare
# `docker build .`: the helper (sandbox/image.py) stages a small build context holding this file,
# sandbox/__init__.py, sandbox/protocol.py, sandbox/runner/ and `pydeps/`, a site-packages tree of the
# Python packages BASE lacks, installed on the host from wheels (`pip install --target`, offline
# inside the build: nothing in here ever reaches PyPI or any other network).
#
# BASE: production uses an official CUDA PyTorch image (torch + torchvision already inside; pin it by
# digest). CI and machines without a registry pass a base made from Debian packages plus the torch
# wheels (`--base local`, see sandbox.image.ensure_local_base). The same file builds both.
ARG BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

USER root

# Packages the base lacks (optuna, safetensors, ...; also torch/torchvision on a bare Python base).
# A .pth file appends them to the base's own site-packages, so the base's copy of a package wins.
COPY pydeps/ /opt/lemur/site/
RUN set -eu; \
    site_dir="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    mkdir -p "$site_dir"; \
    echo /opt/lemur/site > "$site_dir/zz-lemur-sandbox.pth"

# The runner only (it imports the standard library, numpy, torch, torchvision, optuna, safetensors and
# sandbox.protocol; for export_onnx also onnx and onnxscript, whose absence it reports as the job's
# onnx_error). Copied last: a runner change rebuilds only these small layers.
COPY sandbox/__init__.py sandbox/protocol.py /opt/lemur/sandbox/
COPY sandbox/runner/ /opt/lemur/sandbox/runner/

ENV PYTHONPATH=/opt/lemur \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONNOUSERSITE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    NVIDIA_VISIBLE_DEVICES=void \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LANG=C.UTF-8

# Valid .pyc files for a read-only root: `unchecked-hash` never compares source mtimes, so Python
# neither recompiles in memory on every start (~1 s per `import torch`) nor tries to write.
# No setuid/setgid binaries (defence in depth; no-new-privileges already neuters them).
# Mount points for the job (the root is read-only at run time).
RUN set -eu; \
    find /opt/lemur -name '__pycache__' -prune -exec rm -rf {} +; \
    python3 -c "import compileall as c, py_compile as p; c.compile_dir('/opt/lemur', quiet=2, workers=0, \
        invalidation_mode=p.PycInvalidationMode.UNCHECKED_HASH)"; \
    chmod -R a+rX,go-w /opt/lemur; \
    find / -xdev -type f -perm /6000 -exec chmod ug-s {} + 2>/dev/null || true; \
    mkdir -p /job/in /job/out /data; \
    python3 -c "import numpy, torch, torchvision, optuna, safetensors, onnx, onnxscript, sandbox.protocol, sandbox.runner"

LABEL org.opencontainers.image.title="lemur-agent-server sandbox runner" \
      lemur-agent-server.sandbox-image="1"

WORKDIR /job/out
USER 65534:65534
ENTRYPOINT []
CMD ["python3", "-m", "sandbox.runner", "/job/in/spec.json"]
