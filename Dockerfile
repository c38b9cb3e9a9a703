# One image for every Latch service: `latch serve`, `latch broker`, `latch api`, `latch sim`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY latch ./latch
COPY protocol ./protocol
COPY broker ./broker
COPY api ./api
COPY device_sim ./device_sim
COPY firmware ./firmware
COPY mqtt_client ./mqtt_client
COPY bench ./bench
RUN pip install --no-cache-dir .
ENV LATCH_HOST=0.0.0.0 LATCH_DATA_DIR=/data
VOLUME /data
EXPOSE 8000 1883
ENTRYPOINT ["latch"]
CMD ["serve", "--demo-fleet", "100"]
