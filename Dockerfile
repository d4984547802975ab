# kdns: cluster DNS for Kubernetes, a drop-in image for kube-dns (see deploy/ and docs/migration.md).
#
#   docker build -t kdns .                 # or: buildah bud -t kdns .
#
# BASE_IMAGE is the runtime; BUILDER_IMAGE (default: the same) compiles the extension. Both must
# carry the same Python 3.11 at the same path: the runtime receives a virtualenv made in the
# builder, and a virtualenv points at its interpreter by path. tests/imagebuild.sh passes
# debootstrap-made Debian bases here because base images cannot be pulled where the tests run.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUILDER_IMAGE=${BASE_IMAGE}

FROM ${BUILDER_IMAGE} AS builder
# python:3.11-slim has the headers but no C compiler. A builder that already has one (the test
# base) skips apt, so the build needs no Debian mirror then.
RUN if ! command -v gcc >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A throw-away venv for the build tools, so the build never touches the base's own Python
# (Debian's is "externally managed" and has no pip).
RUN python3 -m venv /opt/build
WORKDIR /src
COPY . .
# The wheel (with both compiled extensions) and its dependencies' wheels; then a pip-less venv
# holding only those, which is all the runtime stage receives. The import (from /, where the
# source tree cannot shadow the installed package) proves the extensions were built.
RUN /opt/build/bin/pip wheel --wheel-dir /wheels . \
    && python3 -m venv --without-pip /opt/kdns \
    && /opt/build/bin/pip --python /opt/kdns/bin/python install --no-index --find-links /wheels kdns \
    && cd / && /opt/kdns/bin/python -c 'import kdns.packet._fastpath, kdns.zone._compile'

FROM ${BASE_IMAGE}
# `kdns node-local` sets the node up as NodeLocal DNSCache does (a link-local interface and
# NOTRACK rules), with ip and iptables: the same image serves both roles. A base that already
# has them (the test base) skips apt.
RUN if ! command -v ip >/dev/null || ! command -v iptables >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends iproute2 iptables \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in the pod (pip already compiled
# the bytecode at install time). TMPDIR: the only writable place a read-only pod is sure to
# have is the runtime's /dev/shm tmpfs (the kubernetes client writes certificates from a
# kubeconfig to temporary files).
ENV PATH=/opt/kdns/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/dev/shm
COPY --from=builder /opt/kdns /opt/kdns
# Port 53 as a non-root user with only NET_BIND_SERVICE: a file capability on the interpreter
# the venv runs (the venv's python is a symlink; capabilities live on the real file). These are
# the bytes `setcap cap_net_bind_service=+ep` writes (VFS_CAP_REVISION_2 | EFFECTIVE, permitted
# bit 10), written from Python because slim bases have no setcap and the runtime stage should
# not need apt. Consequence: the container must keep NET_BIND_SERVICE in its bounding set
# (drop ALL + add NET_BIND_SERVICE, as deploy/ does), or the kernel refuses to exec python.
# Without file capabilities, use sysctl net.ipv4.ip_unprivileged_port_start=53 in the pod.
RUN python3 -c 'import os, struct; \
p = os.path.realpath("/opt/kdns/bin/python"); \
os.setxattr(p, "security.capability", struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)); \
print("cap_net_bind_service=ep on", p)' \
    && python3 -c 'import kdns.packet._fastpath, kdns.zone._compile, kdns.cli'
# Numeric, so kubelet can check runAsNonRoot; 1001 is the uid of kube-dns's containers.
USER 1001:1001
EXPOSE 53/udp 53/tcp 8080/tcp 8081/tcp 8181/tcp 9153/tcp 10054/tcp
ENTRYPOINT ["kdns", "serve"]
