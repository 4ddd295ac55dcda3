# chatd image. In containers, point DATABASE_URL / REDIS_URL at real servers;
# the embedded default is for a single machine.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY chatd ./chatd
COPY sql ./sql
COPY config ./config
RUN pip install . && useradd --system --home /app chatd && mkdir -p /app/var && chown chatd /app/var
USER chatd
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health/ready').status != 200)"
CMD ["chatd", "serve", "--host", "0.0.0.0"]
