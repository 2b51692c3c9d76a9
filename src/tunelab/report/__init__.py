"""HTML reports built only from what a finished run directory holds.

`write_run(run_dir)`  -> run_dir/report.html: base vs tuned, forgetting, curves, confusion matrix, samples,
                         data report, config.
`write_compare(out_dir, rows)` -> out_dir/report.html: what each method of `tunelab compare` cost and gained.
"""

from __future__ import annotations

from .run import _run_link, write_compare, write_run

__all__ = ["write_compare", "write_run"]
