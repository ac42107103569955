"""The repository's alembic env: the same as the one the package ships (standalone mode, its own
version table ``pq_alembic_version``), run fresh for each command."""

import runpy
from pathlib import Path

import sqla_pq.migrations

runpy.run_path(str(Path(sqla_pq.migrations.__file__).with_name("env.py")))
