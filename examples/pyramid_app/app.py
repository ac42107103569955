"""Serve the Pyramid signup example with a worker thread, in one command:

    python examples/pyramid_app/app.py        # http://127.0.0.1:6543

It loads ``development.ini`` (next to this file), creates the tables, runs a sqla_pq worker in
a thread (each job in a request and transaction of its own) and serves the app with the
standard library's WSGI server.  Without ``DATABASE_URL`` it uses the embedded PostgreSQL
(``pip install -e '.[embedded,pyramid]'``).  Workers as separate processes instead:

    PYTHONPATH=examples/pyramid_app \
      sqla-pq worker --ini examples/pyramid_app/development.ini pyramid-emails
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from wsgiref.simple_server import make_server

HERE = Path(__file__).resolve().parent
INI = str(HERE / "development.ini")


def main() -> None:
    sys.path.insert(0, str(HERE))  # what `use = call:signup_app:main` imports
    import signup_app
    from pyramid.paster import get_app, setup_logging

    from sqla_pq.pyramid import get_pq, worker

    setup_logging(INI)
    app = get_app(INI)
    signup_app.create_tables(app.registry)
    queue = get_pq(app.registry).settings.default_queue  # sqla_pq.default_queue in the ini
    w = worker(app.registry, [queue], isolation="thread", concurrency=2)
    thread = threading.Thread(target=w.run, name="sqla_pq-worker", daemon=True)
    thread.start()
    port = int(os.environ.get("PORT", "6543"))
    with make_server("127.0.0.1", port, app) as server:
        print(f"Serving on http://127.0.0.1:{port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            w.request_stop()  # finish the jobs in hand, leave the workers' table tidy
            thread.join(30)


if __name__ == "__main__":
    main()
