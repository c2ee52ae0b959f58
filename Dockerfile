# mailserver container image: one process, logs on stderr, configuration,
# queue and mailboxes on volumes.  See docs/embedding.md ("Containers").
#
#   docker build -t mailserver .
#   docker run -d --name mail -p 25:25 -e MAILSERVER_MYHOSTNAME=mail.example.org mailserver
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The unprivileged user "mailserver" (uid/gid 5000) the server runs as;
# fixed IDs so that volume ownership is predictable on the host.
RUN groupadd --system --gid 5000 mailserver \
    && useradd --system --uid 5000 --gid mailserver --no-create-home \
       --home-dir /var/spool/mailserver --shell /usr/sbin/nologin mailserver

WORKDIR /usr/src/mailserver
COPY pyproject.toml README.md ./
COPY mailserver ./mailserver
RUN pip install --no-cache-dir . \
    && rm -rf /usr/src/mailserver

COPY docker/config.toml /usr/local/share/mailserver/config.toml
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/mailserver-entrypoint
RUN mkdir -p /var/spool/mailserver /var/mail/vhosts /etc/mailserver \
    && chown -R mailserver:mailserver /var/spool/mailserver /var/mail /etc/mailserver

WORKDIR /var/spool/mailserver
USER 5000:5000
# (= mailserver:mailserver; numeric so that runtimes can check runAsNonRoot)

# smtp, submission, smtps.  A non-root user may bind them inside the
# container's network namespace on Docker 20.10+ and Podman
# (net.ipv4.ip_unprivileged_port_start=0, no capability needed); elsewhere
# set that sysctl or listen on high ports and map them (docs/embedding.md,
# "Ports and CAP_NET_BIND_SERVICE").
EXPOSE 25 587 465
VOLUME ["/var/spool/mailserver", "/var/mail", "/etc/mailserver"]

HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["mailserver-entrypoint", "mailserver", "status"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["mailserver-entrypoint"]
CMD ["mailserver", "run"]
