# One image recipe for both services, built from the repo root so `shared` installs as a package:
#   docker build --target producer .    docker build --target consumer .
# No `# syntax=` line: BuildKit would fetch a frontend image from Docker Hub on every build; the
# built-in one handles everything here. The base images are build arguments, the official ones by
# default, so a mirror or a local build of the same software can stand in. uv's version is the
# one the Makefile installs (tests/deploy/test_files.py checks they agree).
ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app
WORKDIR /src
ARG SERVICE
# Dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
COPY shared/pyproject.toml shared/
COPY producer/pyproject.toml producer/
COPY consumer/pyproject.toml consumer/
COPY cli/pyproject.toml cli/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package "${SERVICE}"
COPY shared shared
COPY producer producer
COPY consumer consumer
COPY cli cli
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package "${SERVICE}"

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --no-create-home app
ENV PATH=/app/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001

FROM runtime AS producer
COPY --from=build /app /app
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "producer"]

FROM runtime AS consumer
COPY --from=build /app /app
CMD ["python", "-m", "consumer"]
