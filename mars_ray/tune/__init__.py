"""``mars tune``: Ray Tune over config keys (α, K_bg, training knobs) with MLflow tracking.

``space`` parses a search-space file and checks every value it can produce; ``trial`` runs one
trial's stages in ``RUN/trials/<trial_id>``; ``sweep`` prepares the shared inputs, runs Tune and
writes the results; ``report`` turns them into ``results.csv``, a table, ``heatmap.png`` and label
montages.

``features`` is content-addressed (``features.cache_dir = RUN/cache``): trials differing only in α
share one clustering per K_bg (``stages/cache.py``).

Resources: each trial reserves one placement-group bundle of 1 CPU, which its own Ray core actor
(``select``'s reduction actor, captured by the trial's placement group) uses; the trial function
itself takes 0 CPU, and its Ray Data stages run outside the placement group (Ray Data schedules with
``SPREAD``), so a local run needs 2 CPUs per concurrent trial — checked before the sweep starts.

Outputs: ``RUN/tune/results.csv``, ``RUN/tune/heatmap.png``, ``RUN/tune/best.yaml`` (a full config
``mars run --config`` accepts), ``RUN/tune/summary.json`` (with ``artifact_errors``: MLflow uploads
that failed), MLflow runs (one per trial) in ``RUN/mlflow.db`` unless
``--tracking-uri``/``$MLFLOW_TRACKING_URI`` says otherwise.

``RUN`` may be an object-store URI (``s3://bucket/run``, ``mars_ray.storage``): trials, the features
cache and Tune's own experiment state then live there too, and the tracking URI must be given
(``tracking.resolve_tracking_uri``); MLflow artifacts go to ``RUN/mlartifacts``.
"""

from mars_ray.tune.report import format_table
from mars_ray.tune.space import OBJECTIVES, Space, grid_size, load_space, milestones, validate_space
from mars_ray.tune.sweep import CACHE_DIR, TUNE_DIR, run_sweep
from mars_ray.tune.trial import METRICS, TRIALS_DIR, run_trial

__all__ = ["CACHE_DIR", "METRICS", "OBJECTIVES", "Space", "TRIALS_DIR", "TUNE_DIR", "format_table", "grid_size",
           "load_space", "milestones", "run_sweep", "run_trial", "validate_space"]
