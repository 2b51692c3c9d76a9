"""HTML reports built only from what a finished run directory holds.

`write_run(run_dir)`  -> run_dir/report.html: base vs tuned, forgetting, curves, confusion matrix, samples,
                         data report, config (run.py).
`write_compare(out_dir, rows)` -> out_dir/report.html: what each method of `tunelab compare` cost and gained
                         (compare.py).

A page is one self-contained file: no script, no external CSS or font; plots are matplotlib figures drawn
with Agg and embedded as base64 PNG (plots.py), so the page opens offline, from an archive or an attachment.
Every optional input that is missing or unreadable becomes a note in its section, never an exception: the
report is written at the end of a run and must not fail it. Everything that comes from the user's data or
files is HTML-escaped (markup.py; labels and texts may hold markup).
"""

from __future__ import annotations

from .compare import run_link, write_compare
from .run import write_run

_run_link = run_link  # the name tests/test_report.py has always called

__all__ = ["run_link", "write_compare", "write_run"]
