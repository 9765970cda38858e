# CI only: Debian's PostgreSQL with the database and user docker-compose.yml expects.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && V=$(ls /etc/postgresql) \
 && echo "listen_addresses = '*'" >> /etc/postgresql/$V/main/postgresql.conf \
 && echo "host all all 0.0.0.0/0 md5" >> /etc/postgresql/$V/main/pg_hba.conf \
 && pg_ctlcluster $V main start \
 && su postgres -c "psql -q -c \"CREATE USER blip2 PASSWORD 'blip2'\" && createdb -O blip2 blip2" \
 && pg_ctlcluster $V main stop \
 && ln -s /usr/lib/postgresql/$V/bin /usr/lib/postgresql/bin && ln -s /etc/postgresql/$V/main /etc/postgresql/main \
 && ln -s /var/lib/postgresql/$V/main /var/lib/postgresql/main
USER postgres
CMD ["/usr/lib/postgresql/bin/postgres", "-D", "/var/lib/postgresql/main", "-c", "config_file=/etc/postgresql/main/postgresql.conf"]
