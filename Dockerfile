# syntax=docker/dockerfile:1
# One image for the API, the worker, MLflow, Flower and migrations (docker-compose.yml
# picks the command). Build: `docker compose build`.
FROM python:3.11-slim

# MLFLOW_DISABLE_TELEMETRY: MLflow 3 reports usage to its makers from every process that
# imports it (client, server, UI); a self-hosted Descent does not (an operator may set it false).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

# torch first, in a layer of its own: gigabytes that change far less often than
# our code. The wheel index picks the CUDA build (bundled CUDA runtime; the host
# needs only the NVIDIA driver and container toolkit), and torchvision with it from
# the same index, so the two match (each torchvision requires one torch exactly).
# If pyproject.toml pins a torch this index lacks, the next step replaces it with the
# one from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
RUN pip install --index-url "${TORCH_INDEX_URL}" torch torchvision

WORKDIR /app
COPY pyproject.toml ./
COPY api/ api/
COPY worker/ worker/
COPY trainer/ trainer/
COPY jobs/ jobs/
COPY launcher/ launcher/
COPY descent/ descent/
COPY migrations/ migrations/
COPY alembic.ini ./
COPY deploy/mlflow-auth.ini deploy/
RUN pip install ".[deploy]" && rm -rf build *.egg-info

# Runs as an unprivileged user. Directories that named volumes mount over are
# created here with that owner, so Docker initialises the volumes writable.
RUN useradd --create-home --uid 10001 --user-group descent \
    && mkdir -p /mlartifacts /var/lib/descent /var/lib/descent-datasets /var/lib/mlflow-auth \
    && chown descent:descent /mlartifacts /var/lib/descent /var/lib/descent-datasets /var/lib/mlflow-auth
USER descent

# The copies under /app are what runs (alembic needs alembic.ini and migrations/ there).
ENV PYTHONPATH=/app
EXPOSE 8000 5000 5555
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
