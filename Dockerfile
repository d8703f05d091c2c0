# capbalancer's image: `make image` builds it as capbalancer:<version> (the name the Kubernetes output uses).
# Stage 1 builds the wheel (it carries profiles/ and deploy/, see setup.py) with the scheduling core compiled by
# mypyc (CAPBALANCER_COMPILE=1: about 4x less CPU per decision, 1.3x the proxy's requests/s; bench/results/
# compiled.md), and the wheels of its dependencies; stage 2 installs only those wheels, with no compiler or build
# tools, and runs as a non-root user. `capbalancer --version` in the image says "scheduling core: compiled".
FROM python:3.11-slim-bookworm AS build
# A C compiler for mypyc's output (the image has Python's headers). Debian's bookworm-pinned versions of the day.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY capbalancer ./capbalancer
COPY profiles ./profiles
COPY deploy ./deploy
COPY tools/build_backend.py tools/compile_sched.py ./tools/
RUN CAPBALANCER_COMPILE=1 pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin capbalancer
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels /wheels/capbalancer-*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# The proxy answers /ready once a backend is routable (Kubernetes probes it; see deploy --target kubernetes).
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status != 200)"]
ENTRYPOINT ["capbalancer"]
# With no --config or --backend: the embedded simulated cluster (a demo). Mount a config and pass --config.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
