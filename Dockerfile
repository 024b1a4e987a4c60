# anyserve: one image for the API server and the replicas (the command picks the role:
# `anyserve api-server ...`, `anyserve start --app ...`). deploy/kubernetes/ runs it.
#
#   docker build -t anyserve .
#
# Two stages: wheels are built in the first, so the image holds no compiler, pip
# cache or source tree; only the installed package and examples/ (the sample apps
# the Kubernetes manifests serve). Your own app: build FROM this image, COPY it into
# /app and pip install its dependencies.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY anyserve ./anyserve
# fast: kept for older pins (uvloop is a core dependency now); redis: the shared registry (`anyserve api-server --registry redis://...`).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[fast,redis]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "anyserve[fast,redis]" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /app anyserve
WORKDIR /app
# App specs such as examples.chat_app:app resolve from the working directory.
COPY examples ./examples
# A numeric user, so Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
# 8080 API server HTTP, 8081 API server gRPC, 50051 a replica's gRPC.
EXPOSE 8080 8081 50051
ENTRYPOINT ["anyserve"]
CMD ["--help"]
