# syntax=docker/dockerfile:1
# Kustody: one image, two commands — `kustody operator` and `kustody hsm` (the PKCS#11 sidecar).
#   docker build -t ghcr.io/kustody/kustody:dev .
#   make image     # podman, and with no registry a PYTHON_IMAGE made here from Debian packages
#                  # (tools/image/base.sh): --build-arg PYTHON_IMAGE=localhost/python:3.11-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# python-pkcs11 may need a compiler where no wheel fits the platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY operator ./operator
# gRPC code is generated, never committed (as `make proto` does).
RUN pip install --no-cache-dir grpcio-tools==1.85.1 \
 && python -m grpc_tools.protoc -Iproto --python_out=operator --pyi_out=operator \
      --grpc_python_out=operator $(find proto -name '*.proto') \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kustody" \
      org.opencontainers.image.description="Kubernetes operator that keeps encryption keys in an HSM" \
      org.opencontainers.image.source="https://github.com/kustody/kustody" \
      org.opencontainers.image.licenses="Apache-2.0"
# softhsm2 provides /usr/lib/softhsm/libsofthsm2.so and softhsm2-util (the token init container).
RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 \
 && rm -rf /var/lib/apt/lists/* /var/lib/softhsm/tokens/* \
 && groupadd --gid 10001 kustody \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kustody
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels kustody \
 && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KUSTODY_HSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
# A numeric user, so `runAsNonRoot` can be verified without an /etc/passwd lookup.
USER 10001:10001
ENTRYPOINT ["kustody"]
CMD ["--help"]
