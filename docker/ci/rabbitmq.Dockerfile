# CI only: Debian's RabbitMQ, guest allowed from other containers (as the official image does).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && echo "loopback_users = none" > /etc/rabbitmq/rabbitmq.conf
CMD ["rabbitmq-server"]
