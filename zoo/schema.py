"""The zoo's SQLite schema and its forward migrations.

Why this shape (see the LEMUR notes): LEMUR stores hyperparameters as key-value rows (7.6x duplicated)
and has only single-column indexes, so its filtered best-only query takes 30 s. Here:

- `model` holds each distinct network once (code, hashes, architecture stats).
- `run` is one training run (one Optuna trial, or one imported LEMUR trial) with its hyperparameters
  stored once, as JSON.
- `point` is one learning-curve point of a run. A point is what LEMUR calls a record ("the model after
  N epochs"), so queries read this table. The filter columns (task, dataset, metric, model_id) are
  copied from the run so the covering index below answers the best-per-model query without a join.
- `weights` are content-addressed files beside the zoo, referenced per run.
- `job` is the evaluator's persistent queue: jobs survive server restarts.

A migration is a list of statements; `migrate()` applies the missing ones in one transaction each
and records `schema_version` in `meta`.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[list[str]] = [
    # version 1
    [
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE model (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            code TEXT NOT NULL,
            code_hash TEXT NOT NULL,          -- sha256 of the normalized code (zoo.codehash)
            lemur_id TEXT NOT NULL,           -- md5 of the code without whitespace (LEMUR's nn_id)
            prefix TEXT,
            origin TEXT NOT NULL,             -- seed | lemur | submitted
            fingerprint TEXT,                 -- architecture fingerprint (identical graphs share it)
            params INTEGER,
            flops INTEGER,
            code_quality REAL,
            code_quality_detail TEXT,         -- JSON breakdown
            supported_hyperparameters TEXT,   -- JSON list
            created REAL NOT NULL
        )""",
        "CREATE INDEX model_code_hash ON model(code_hash)",
        "CREATE INDEX model_fingerprint ON model(fingerprint)",
        "CREATE INDEX model_lemur_id ON model(lemur_id)",
        """CREATE TABLE run (
            id INTEGER PRIMARY KEY,
            uid TEXT NOT NULL UNIQUE,         -- stable identity (LEMUR trial uid, job/trial/repeat)
            model_id INTEGER NOT NULL REFERENCES model(id) ON DELETE CASCADE,
            task TEXT NOT NULL,
            dataset TEXT NOT NULL,
            metric TEXT NOT NULL,
            transform TEXT,
            prm TEXT NOT NULL DEFAULT '{}',   -- JSON object, stored once per run
            seed INTEGER,
            epochs REAL,                      -- epochs reached (last curve point)
            status TEXT NOT NULL,             -- succeeded | failed | timed_out | pruned | imported
            accuracy REAL,                    -- test accuracy at the last point
            duration_ns INTEGER,              -- training-only time at the last point
            accuracy_to_time REAL,
            device TEXT,
            versions TEXT,                    -- JSON: python, torch, ...
            dataset_hash TEXT,
            job_id TEXT,
            trial INTEGER,
            repeat INTEGER,
            selected INTEGER NOT NULL DEFAULT 0,  -- the trial Optuna selected for its job
            train_samples INTEGER,            -- images in the training split actually used
            test_samples INTEGER,             -- images the test accuracy was computed on
            isolation TEXT,                   -- JSON: what sandbox ran it
            error TEXT,                       -- JSON {stage, kind, message}
            source TEXT NOT NULL,             -- evaluator | lemur-import
            created REAL NOT NULL
        )""",
        "CREATE INDEX run_model ON run(model_id, task, dataset, metric)",
        "CREATE INDEX run_job ON run(job_id)",
        "CREATE INDEX run_filter ON run(task, dataset, metric, status)",
        """CREATE TABLE point (
            run_id INTEGER NOT NULL REFERENCES run(id) ON DELETE CASCADE,
            epoch REAL NOT NULL,
            model_id INTEGER NOT NULL,
            task TEXT NOT NULL,
            dataset TEXT NOT NULL,
            metric TEXT NOT NULL,
            accuracy REAL,                    -- test accuracy computed by the server
            val_accuracy REAL,
            loss REAL,
            duration_ns INTEGER,              -- cumulative training-only time
            accuracy_to_time REAL,
            elapsed_s REAL,                   -- wall clock since the run started, evaluation included
            created REAL NOT NULL,
            PRIMARY KEY (run_id, epoch)
        ) WITHOUT ROWID""",
        # best-per-model for one task/dataset/metric/epoch, answered from the index alone
        # (with the primary key run_id, epoch it also covers every sort key of a page)
        "CREATE INDEX point_filter ON point(task, dataset, metric, epoch, model_id, accuracy, duration_ns,"
        " accuracy_to_time, created)",
        "CREATE INDEX point_model ON point(model_id, epoch)",
        "CREATE INDEX point_accuracy ON point(accuracy)",
        "CREATE INDEX point_a2t ON point(accuracy_to_time)",
        "CREATE INDEX point_duration ON point(duration_ns)",
        "CREATE INDEX point_created ON point(created)",
        # Best point per (task, dataset, metric, model, epoch), maintained on every write: the
        # best-only and unique_nn queries read ~one row per model instead of every point.
        """CREATE TABLE best_point (
            task TEXT NOT NULL,
            dataset TEXT NOT NULL,
            metric TEXT NOT NULL,
            epoch REAL NOT NULL,
            model_id INTEGER NOT NULL,
            accuracy REAL NOT NULL,
            duration_ns INTEGER,
            accuracy_to_time REAL,
            created REAL NOT NULL,
            run_id INTEGER NOT NULL,
            PRIMARY KEY (task, dataset, metric, epoch, model_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX best_point_model ON best_point(model_id, accuracy)",
        # unique_nn within one task/dataset/metric groups by model without a sort
        "CREATE INDEX best_point_by_model ON best_point(task, dataset, metric, model_id, accuracy, duration_ns,"
        " accuracy_to_time, created, epoch, run_id)",
        "CREATE INDEX best_point_accuracy ON best_point(accuracy)",
        """CREATE TABLE weights (
            run_id INTEGER PRIMARY KEY REFERENCES run(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            path TEXT NOT NULL,               -- relative to the zoo's weights dir
            format TEXT NOT NULL DEFAULT 'safetensors'
        )""",
        """CREATE TABLE job (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,               -- submit | check
            status TEXT NOT NULL,
            request TEXT NOT NULL,            -- JSON of the validated request (code included)
            model_name TEXT,
            progress TEXT,                    -- JSON
            result TEXT,                      -- JSON
            error TEXT,                       -- JSON {stage, kind, message, log_tail}
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            owner TEXT,                       -- server instance that runs it
            heartbeat REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            started REAL,
            finished REAL
        )""",
        "CREATE INDEX job_status ON job(status, created)",
    ],
    # version 2: what LEMUR 2.2's database holds beyond its records (see lemur_agent_server.lemur_db_import)
    [
        # per-epoch training diagnostics of a curve point (LEMUR's train_stat, 1:1 with its record),
        # typed columns (no JSON per row: 578k rows of JSON cost twice the space)
        """CREATE TABLE point_train (
            run_id INTEGER NOT NULL REFERENCES run(id) ON DELETE CASCADE,
            epoch REAL NOT NULL,
            train_loss REAL,
            test_loss REAL,
            train_accuracy REAL,
            gradient_norm REAL,
            samples_per_second REAL,
            cpu_usage_percent REAL,
            occupied_ram_kb REAL,
            ram_usage_percent REAL,
            occupied_gpu_memory_kb REAL,
            gpu_memory_usage_percent REAL,
            PRIMARY KEY (run_id, epoch)
        ) WITHOUT ROWID""",
        # the machines runs trained on, each distinct description once, and which run used which
        """CREATE TABLE hardware (
            id INTEGER PRIMARY KEY,
            spec TEXT NOT NULL UNIQUE         -- JSON: cpu_count, cpu_type, total_ram_kb, gpu_type, ...
        )""",
        """CREATE TABLE run_hardware (
            run_id INTEGER PRIMARY KEY REFERENCES run(id) ON DELETE CASCADE,
            hardware_id INTEGER NOT NULL REFERENCES hardware(id)
        )""",
        # LEMUR's side tables, one row per source row (`lemur_id` = its primary key, so re-imports add
        # nothing); `data` keeps every column under LEMUR's names, the typed columns are for filters
        """CREATE TABLE lemur_nn_stat (
            lemur_id TEXT PRIMARY KEY,
            model_name TEXT NOT NULL,
            prm_id TEXT,
            total_params INTEGER,
            flops INTEGER,
            model_size_mb REAL,
            error TEXT,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX lemur_nn_stat_model ON lemur_nn_stat(model_name)",
        """CREATE TABLE lemur_mobile_run (
            lemur_id TEXT PRIMARY KEY,
            model_name TEXT NOT NULL,
            device_type TEXT,
            precision_type TEXT,
            valid INTEGER,
            duration INTEGER,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX lemur_mobile_run_model ON lemur_mobile_run(model_name, device_type)",
        """CREATE TABLE lemur_tflite (
            lemur_id TEXT PRIMARY KEY,
            model_name TEXT NOT NULL,
            accuracy REAL,
            precision_type TEXT,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX lemur_tflite_model ON lemur_tflite(model_name)",
        """CREATE TABLE lemur_prun (
            lemur_id TEXT PRIMARY KEY,
            model_name TEXT NOT NULL,
            pruning_method TEXT,
            task_dataset TEXT,
            accuracy REAL,
            pruning_ratio REAL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX lemur_prun_model ON lemur_prun(model_name, pruning_method)",
    ],
    # version 3: batches (submit_models): the batch a job belongs to, the order jobs finished in (wait_jobs'
    # cursor), the experiment key duplicates are found by, and the job a reused result came from.
    # `finished_seq` is drawn from meta's `job_finished_seq` counter inside the transaction that ends
    # the job; writers are serialized (BEGIN IMMEDIATE), so a reader never sees seq n+1 without n.
    [
        "ALTER TABLE job ADD COLUMN batch_id TEXT",
        "ALTER TABLE job ADD COLUMN finished_seq INTEGER",
        "ALTER TABLE job ADD COLUMN dedup_key TEXT",
        "ALTER TABLE job ADD COLUMN reused_from TEXT",
        "UPDATE job SET finished_seq = s.n FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY finished, rowid) AS n"
        " FROM job WHERE finished IS NOT NULL) AS s WHERE job.id = s.id",
        "INSERT INTO meta(key, value) SELECT 'job_finished_seq', COALESCE(MAX(finished_seq), 0) FROM job",
        "CREATE INDEX job_batch ON job(batch_id, started)",
        "CREATE UNIQUE INDEX job_finished_seq ON job(finished_seq)",
        "CREATE INDEX job_dedup ON job(dedup_key, status)",
    ],
    # version 4: model_analysis, the outcome of `lemur-agent-server analyze` per model (lemur_agent_server.analyze)
    # so a model that does not build is recorded once with its reason and not retried on every run
    [
        """CREATE TABLE model_analysis (
            model_id INTEGER PRIMARY KEY REFERENCES model(id) ON DELETE CASCADE,
            status TEXT NOT NULL,             -- ok | failed | skipped (not analysable, e.g. a non-image task)
            error TEXT,                       -- JSON {kind, message} when not ok
            detail TEXT,                      -- JSON: input shape and dataset used, seconds, quality error
            analysed_at REAL NOT NULL
        )""",
        "CREATE INDEX model_analysis_status ON model_analysis(status)",
    ],
    # version 5 (repro): what a run needs to be repeated and compared (issue 13): the evaluation protocol
    # (`default`: selected on a validation split carved from train; `lemur`: LEMUR's check_nn, whole train
    # split, test accuracy after the last epoch; imported LEMUR records are `lemur`), the precision, whether
    # deterministic algorithms were on, and the sandbox's environment (JSON: device, CPU, threads, harness,
    # split seed, ...). A NULL protocol reads by source (zoo.query.RUN_PROTOCOL_SQL): bulk importers need not set it.
    [
        "ALTER TABLE run ADD COLUMN protocol TEXT",
        "ALTER TABLE run ADD COLUMN precision TEXT",
        "ALTER TABLE run ADD COLUMN deterministic INTEGER",
        "ALTER TABLE run ADD COLUMN environment TEXT",
        "UPDATE run SET protocol = CASE WHEN source = 'evaluator' THEN 'default' ELSE 'lemur' END",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)

# Upsert of one point into best_point: strictly better accuracy wins, so ties keep the first row.
BEST_POINT_UPSERT = (
    "INSERT INTO best_point(task, dataset, metric, epoch, model_id, accuracy, duration_ns, accuracy_to_time,"
    " created, run_id) VALUES(?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(task, dataset, metric, epoch, model_id) DO UPDATE SET accuracy=excluded.accuracy,"
    " duration_ns=excluded.duration_ns, accuracy_to_time=excluded.accuracy_to_time, created=excluded.created,"
    " run_id=excluded.run_id WHERE excluded.accuracy > best_point.accuracy"
)


def rebuild_best_points(conn: sqlite3.Connection) -> int:
    """Recompute best_point from point (after bulk loads that bypass the store). Returns its row count."""
    conn.execute("DELETE FROM best_point")
    conn.execute(
        "INSERT INTO best_point(task, dataset, metric, epoch, model_id, accuracy, duration_ns, accuracy_to_time,"
        " created, run_id) SELECT task, dataset, metric, epoch, model_id, MAX(accuracy), duration_ns,"
        " accuracy_to_time, created, run_id FROM point WHERE accuracy IS NOT NULL"
        " GROUP BY task, dataset, metric, epoch, model_id")
    return conn.execute("SELECT COUNT(*) FROM best_point").fetchone()[0]


def current_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION. Safe to call from several processes at once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = current_version(conn)
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"The zoo has schema version {version}, newer than this server ({SCHEMA_VERSION}). "
                "Upgrade lemur-agent-server or point --zoo at another file."
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(target),),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION
