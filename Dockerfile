FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir -e .
ENV PYTHONUNBUFFERED=1
CMD ["jarvis-deploy", "api", "--host", "0.0.0.0", "--port", "8000"]
