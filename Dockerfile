# The trusthop demo: signs CloudEvents and carries their trust chain across
# Kafka and RabbitMQ. Built and started by docker-compose.yml (service "demo").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install . \
    && useradd --create-home --uid 10001 trusthop

USER trusthop
CMD ["trusthop", "demo", "--kafka", "kafka:9092", "--amqp", "amqp://guest:guest@rabbitmq:5672/"]
