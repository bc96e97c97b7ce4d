# Redis for hosts without Docker Hub (compose's REDIS_IMAGE=local/redis:7): Debian's redis-server
# on the same local base image as the other stages (docs/deploy.md, offline builds).
#   docker build --network host -f docker/redis.Dockerfile -t local/redis:7 .
# Why a file of its own: compose runs any image with redis-server and redis-cli on PATH and a
# `redis` user owning /data (the official redis image has both); this one only supplies them.
ARG BASE_IMAGE=local/bookworm-python
FROM ${BASE_IMAGE}
RUN apt-get update -q && apt-get install -y -q --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
