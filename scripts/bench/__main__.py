"""``python scripts/bench [--quick] [--only 1,3] [--out FILE]``: run the benchmarks, write the
report (``python scripts/bench --help``)."""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a directory, Python puts scripts/bench/ first on sys.path: its modules would shadow
# top-level ones (``report``, ``data``...). The package is imported from scripts/ instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.main import main  # noqa: E402

sys.exit(main())
