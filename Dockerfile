# The cjm image: the API (`cjm serve`) and the workers (`cjm worker`) run from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY engine ./engine
COPY channels ./channels
RUN pip install --no-cache-dir .

COPY journeys ./journeys
COPY templates ./templates

RUN useradd --system --uid 10001 cjm && mkdir -p /app/var && chown cjm /app/var
USER cjm

ENV CJM_HOST=0.0.0.0 CJM_PORT=8000
EXPOSE 8000
CMD ["cjm", "serve"]
