"""gunicorn settings for the bridge: ``gunicorn -c gunicorn.conf.py wsgi:app`` (make run, the Dockerfile).

Every value comes from the bridge's own settings (``bridge/settings.py``, the one place that reads
the environment), so the web process, ``make run`` and the container agree.

Why these choices:

* ``worker_class``: gunicorn's threaded worker with a read deadline per request
  (``bridge.web.server``). With the sync worker one slow client, or one delivery whose DKIM DNS
  never answers, held a whole process: two of them blocked a two-process bridge past Postal's 5 s
  timeout. With threads such a request holds one thread for at most BRIDGE_READ_TIMEOUT (slow
  bodies, answered 408) or BRIDGE_DKIM_DNS_BUDGET (DNS), while the process's other threads go on.
  Keep-alive connections (which gthread supports and sync does not) also cut the per-request cost
  that dominates the benchmark's tail latency.
* ``threads``: BRIDGE_WEB_THREADS (8): enough to overlap DNS, storage and Redis waits; CPU work is
  serialised per process by the GIL, so use more processes (BRIDGE_WEB_WORKERS) for more cores.
* ``timeout`` 60: gunicorn's heartbeat; with threads it only catches a wedged process. Postal's
  endpoint timeout is at most 60 s, so no answer Postal still waits for is ever cut by it.
* ``control_socket``: gunicorn 27 opens a control socket at one fixed path per user
  (``$XDG_RUNTIME_DIR/gunicorn.ctl`` or ``~/.gunicorn/gunicorn.ctl``): a second instance on the same
  host (the test suite, a scale-out) would take it over, and stopping one would delete the other's.
  Each instance gets its own, named by the port it listens on, under BRIDGE_DATA_DIR/run (none at
  all when that path is too long for a Unix socket).
* ``logger_class``: gunicorn's error log in the bridge's format (JSON lines unless
  BRIDGE_LOG_FORMAT=text), like the app's own lines; the access log (stdout) is JSON lines too,
  each with gunicorn's usual request line as its message.
* metrics: every web process writes its counters into files under BRIDGE_DATA_DIR/metrics/web
  (``bridge.metrics``), emptied when this master starts; ``child_exit`` tells prometheus-client that
  a process died, so a scrape answered by any process shows the totals of all of them.
"""

import sys
from pathlib import Path

from gunicorn.glogging import Logger

from bridge import logs, metrics
from bridge.settings import Settings, SettingsError

try:
    _settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"mailio-bridge: {exc}")

bind = [_settings.listen]
workers = _settings.web_workers
worker_class = "bridge.web.server.BridgeThreadWorker"
threads = _settings.web_threads
timeout = 60
graceful_timeout = 10
keepalive = 5
accesslog = "-"


class BridgeLogger(Logger):
    def setup(self, cfg: object) -> None:
        super().setup(cfg)
        for handler in (*self.error_log.handlers, *self.access_log.handlers):
            handler.setFormatter(logs.formatter(_settings.log_format))


logger_class = BridgeLogger

_run_dir = Path(_settings.data_dir) / "run"
_run_dir.mkdir(parents=True, exist_ok=True)
_control = _run_dir / f"gunicorn-{_settings.listen.rsplit(':', 1)[1]}.ctl"  # one per port on this host
if len(str(_control).encode()) > 100:
    # A Unix socket's path holds at most 107 bytes on Linux: rather no control socket than one that
    # fails to bind (or lands at a path another instance uses).
    control_socket_disable = True
else:
    control_socket = str(_control)

_metrics_dir = metrics.directories(_settings.data_dir)["web"]
metrics.share_through(_metrics_dir)  # before any worker is forked: they inherit it


def on_starting(server: object) -> None:
    metrics.clear(_metrics_dir)  # a previous run's processes are gone, and so are their counts


def child_exit(server: object, worker: object) -> None:
    metrics.process_died(worker.pid)  # type: ignore[attr-defined]
