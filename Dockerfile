# adsvc server image.
#
#   docker build -t adsvc .                                       # base python:3.11-slim
#   docker build --build-arg BASE=adsvc-base:bookworm -t adsvc .  # no registry: deploy/build-base.sh
#   docker run --rm -p 50051:50051 adsvc [--workers 2 --store redis://... --metrics-port 9100]
#
# Two stages: `build` makes the virtual environment /opt/adsvc (dependencies first, so that
# layer is cached until pyproject.toml changes; the protobuf code is generated from protos/
# while the wheel is built, by grpcio-tools from a separate build venv that is not shipped);
# the runtime stage is the base image + that venv + a non-root user.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PYTHONDONTWRITEBYTECODE=1
# Extra CA certificates (e.g. of a TLS-intercepting proxy in front of PyPI) for this stage
# only: deploy/verify.py copies the host's into .build-ca/ of a temporary build context.
# They are never in the repository and never in the runtime image. (pyproject.toml is
# named so the wildcard may match nothing.)
COPY pyproject.toml .build-ca* /tmp/ctx/
RUN if ls /tmp/ctx/*.crt >/dev/null 2>&1; then \
        cp /tmp/ctx/*.crt /usr/local/share/ca-certificates/ && update-ca-certificates >/dev/null; \
    fi \
 && python3 -c "import tomllib; p = tomllib.load(open('/tmp/ctx/pyproject.toml', 'rb')); \
open('/tmp/build-requires.txt', 'w').write('\n'.join(p['build-system']['requires'])); \
open('/tmp/requires.txt', 'w').write('\n'.join(p['project']['dependencies']))" \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install -q wheel -r /tmp/build-requires.txt \
 && python3 -m venv /opt/adsvc \
 && /opt/adsvc/bin/pip install -q -r /tmp/requires.txt
# A C compiler (and Python's headers where the base lacks them) for the native VM, the
# tape and fusion (adsvc/runtime/_scalarvm.c), in this stage only. Best effort: without
# them the wheel is built without the extension and adsvc runs on numpy alone.
RUN (apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
     && (python3 -c "import os, sysconfig, sys; \
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
         || apt-get install -y -qq --no-install-recommends python3-dev)) >/dev/null 2>&1 \
    || echo "no C compiler: the image runs without the native VM"
COPY . /src
# The wheel (protos compiled by setup.py's build hook), installed into /opt/adsvc; its
# dependencies are already there, so this step downloads nothing. pip is not shipped.
RUN /opt/build/bin/pip wheel -q --no-build-isolation --no-deps -w /tmp/wheels /src \
 && /opt/adsvc/bin/pip install -q /tmp/wheels/*.whl \
 && /opt/adsvc/bin/python -c "import adsvc.server, adsvc_protocol.proto.service_pb2_grpc; \
from adsvc.runtime import scalar_vm; \
print('native VM in the image:', scalar_vm.available())" \
 && /opt/adsvc/bin/pip uninstall -q -y pip setuptools

FROM ${BASE}
RUN groupadd --system --gid 10001 adsvc \
 && useradd --system --uid 10001 --gid adsvc --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin adsvc
COPY --from=build /opt/adsvc /opt/adsvc
ENV PATH=/opt/adsvc/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    ADSVC_HEALTH_ADDR=127.0.0.1:50051
USER adsvc:adsvc
EXPOSE 50051
# The gRPC health service (grpc.health.v1) for the adsvc service; ADSVC_HEALTH_ADDR is
# where this container's server listens (set it when you change --port). Plaintext only:
# with --tls-cert, override the healthcheck (see README, Deployment).
HEALTHCHECK --interval=5s --timeout=4s --start-period=20s --retries=3 CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; r = hg.HealthStub(grpc.insecure_channel(os.environ['ADSVC_HEALTH_ADDR'])).Check(h.HealthCheckRequest(service='adsvc.v1.AutodiffService'), timeout=3); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
# Exec form: the server is PID 1 and gets SIGTERM itself (health NOT_SERVING, in-flight
# calls finish within --grace, exit 0). Give `docker stop -t` / stop_grace_period more
# than --grace (+ --drain).
STOPSIGNAL SIGTERM
ENTRYPOINT ["adsvc", "serve", "--host", "0.0.0.0"]
CMD ["--port", "50051"]
