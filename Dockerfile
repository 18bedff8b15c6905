# One image for every hark service; docker-compose picks the service with `hark service NAME`.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.txt requirements-nodeps.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt \
 && pip install --no-deps -r requirements-nodeps.txt \
 && pip uninstall -y torchcodec
COPY pyproject.toml README.md ./
COPY hark ./hark
COPY hark_cli ./hark_cli
COPY services ./services
COPY schemas ./schemas
RUN pip install --no-deps -e . && hark models install
ENV HARK_HEALTH_HOST=0.0.0.0 HARK_HEALTH_PORT=8080
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['HARK_HEALTH_PORT'], timeout=2)"
ENTRYPOINT ["hark", "service"]
