# The cjm image: the API (`cjm serve`) and the workers (`cjm worker`) run from it.

# The build compiles the pure core to C (setup.py, mypyc), which takes a C compiler
# that the image it runs in does without.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY engine ./engine
COPY channels ./channels
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

COPY journeys ./journeys
COPY templates ./templates

RUN useradd --system --uid 10001 cjm && mkdir -p /app/var && chown cjm /app/var
USER cjm

ENV CJM_HOST=0.0.0.0 CJM_PORT=8000
EXPOSE 8000
CMD ["cjm", "serve"]
