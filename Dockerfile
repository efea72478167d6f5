# One image for all of Thaw: the webhook, the extender, the node agent, the certificate controller
# (thaw webhook|extender|agent|certs), and the runtime that workload pods get: /opt/thaw, which the
# thaw-tools init container (`thaw install-runtime`) copies once per node into a hostPath and links at
# /thaw/rt, so `thaw exec` runs in any workload image whatever Python or glibc it has
# (scripts/build-runtime says how).
#
# Build: docker build -t ghcr.io/kube-thaw/thaw:0.1.0 .   (or buildah bud / podman build)
# BASE is any Debian trixie (or newer) image; tests/manifests/test_image.py builds this file with
# buildah from a debootstrapped rootfs where no registry is reachable.
ARG BASE=debian:trixie-slim

FROM ${BASE} AS build
# 1 where the Debian mirror is a frozen snapshot whose Release files have expired (Valid-Until):
# apt then skips that date check, in this build stage only.
ARG APT_SNAPSHOT_MIRROR=0
RUN if [ "$APT_SNAPSHOT_MIRROR" = 1 ]; then \
      printf 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n' >/etc/apt/apt.conf.d/99snapshot; \
    fi \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY thaw/ thaw/
COPY webhook/ webhook/
COPY extender/ extender/
COPY scripts/build-runtime scripts/install-criu scripts/build-criu-fast scripts/
COPY scripts/criu/ scripts/criu/
# The runtime (Python, Thaw, its dependencies and every shared library they load, glibc included)
# and CRIU >= 4.2: Debian trixie's CRIU 4.1.1 cannot dump a process with a TCP socket on 6.18
# kernels, so scripts/install-criu takes 4.2.1 from Debian forky with forky's own glibc, run
# through that glibc's loader (the same install `make criu` does for the tests). pip installs into
# /opt/thaw/python/site only (--target), never into the system Python. Behind a TLS-intercepting
# proxy, pass its CA bundle as a build secret (nothing of it stays in the image):
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt .
RUN --mount=type=secret,id=pip_cert \
    if [ -f /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && PIP_BREAK_SYSTEM_PACKAGES=1 scripts/build-runtime /opt/thaw --python /usr/bin/python3 \
 && /opt/thaw/bin/thaw --help >/dev/null \
 && /opt/thaw/bin/criu --version \
 && /opt/thaw/bin/criu-fast --version

FROM ${BASE}
# sh is all the final image needs beyond /opt/thaw: bin/thaw is a sh wrapper; thaw-tools copies with
# `thaw install-runtime` itself (no cp).
COPY --from=build /opt/thaw /opt/thaw
ENV THAW_CRIU=/opt/thaw/bin/criu
# Non-root by default (the webhook, extender, certificate controller and kube manifests' restricted
# securityContext); the agent DaemonSet sets runAsUser 0 for the root-only snapshot cache.
USER 65532:65532
ENTRYPOINT ["/opt/thaw/bin/thaw"]
CMD ["--help"]
