"""The zoo's SQLite schema and its forward migrations.

Why this shape (see the LEMUR notes): LEMUR stores hyperparameters as key-value rows (7.6x duplicated)
and has only single-column indexes, so its filtered best-only query takes 30 s. Here:

- `model` holds each distinct network once (code, hashes, architecture stats).
- `run` is one training run (one Optuna trial, or one imported LEMUR trial) with its hyperparameters
  stored once, as JSON.
- `point` is one learning-curve point of a run. A point is what LEMUR calls a record ("the model after
  N epochs"), so queries read this table. The filter columns (task, dataset, metric, model_id) are
  copied from the run so the covering index below answers the best-per-model query without a join.
  Since version 5 `point` and `best_point` are views: the rows live in `point_row`/`best_point_row`
  with the (task, dataset, metric) as an id into `scope`: the 2.1.2 wheel's 578k points with their
  indexes (best_point's included) take 113 MB instead of 169.
- `weights` are content-addressed files beside the zoo, referenced per run.
- `job` is the evaluator's persistent queue: jobs survive server restarts.

A migration is a list of statements; `migrate()` applies the missing ones in one transaction each
and records `schema_version` in `meta`.
"""

from __future__ import annotations

import re
import sqlite3

# `point` and `best_point` as their readers know them (version 5 on): the row tables with the scope's
# strings joined back. Writers insert into `point` (its trigger) or the row tables, never update them.
POINT_VIEW = (
    "CREATE VIEW point AS SELECT r.run_id, r.epoch, r.model_id, s.task, s.dataset, s.metric, r.accuracy,"
    " r.val_accuracy, r.loss, r.duration_ns, r.accuracy_to_time, r.elapsed_s, r.created"
    " FROM point_row r JOIN scope s ON s.id = r.scope_id")
BEST_POINT_VIEW = (
    "CREATE VIEW best_point AS SELECT s.task, s.dataset, s.metric, b.epoch, b.model_id, b.accuracy, b.duration_ns,"
    " b.accuracy_to_time, b.created, b.run_id FROM best_point_row b JOIN scope s ON s.id = b.scope_id")
# Inserting into `point`: the scope once (never replaced: point rows refer to its id), then the row.
POINT_INSERT_TRIGGER = """CREATE TRIGGER point_insert INSTEAD OF INSERT ON point BEGIN
    INSERT INTO scope(task, dataset, metric) SELECT NEW.task, NEW.dataset, NEW.metric
        WHERE NOT EXISTS (SELECT 1 FROM scope WHERE task = NEW.task AND dataset = NEW.dataset
                          AND metric = NEW.metric);
    INSERT INTO point_row(run_id, epoch, model_id, scope_id, accuracy, val_accuracy, loss, duration_ns,
                          accuracy_to_time, elapsed_s, created)
        VALUES (NEW.run_id, NEW.epoch, NEW.model_id,
                (SELECT id FROM scope WHERE task = NEW.task AND dataset = NEW.dataset AND metric = NEW.metric),
                NEW.accuracy, NEW.val_accuracy, NEW.loss, NEW.duration_ns, NEW.accuracy_to_time, NEW.elapsed_s,
                NEW.created);
END"""

# Since version 9 a point's `created` is not stored: it is always its run's (both writers, the store and
# the bulk loader, wrote the run's), so the views read it from the run (a LEFT JOIN on run's primary key,
# which SQLite drops from a query that does not read `created`); the trigger ignores NEW.created.
POINT_VIEW_V9 = (
    "CREATE VIEW point AS SELECT r.run_id, r.epoch, r.model_id, s.task, s.dataset, s.metric, r.accuracy,"
    " r.val_accuracy, r.loss, r.duration_ns, r.accuracy_to_time, r.elapsed_s, ru.created"
    " FROM point_row r JOIN scope s ON s.id = r.scope_id LEFT JOIN run ru ON ru.id = r.run_id")
BEST_POINT_VIEW_V9 = (
    "CREATE VIEW best_point AS SELECT s.task, s.dataset, s.metric, b.epoch, b.model_id, b.accuracy, b.duration_ns,"
    " b.accuracy_to_time, ru.created, b.run_id FROM best_point_row b JOIN scope s ON s.id = b.scope_id"
    " LEFT JOIN run ru ON ru.id = b.run_id")
POINT_INSERT_TRIGGER_V9 = """CREATE TRIGGER point_insert INSTEAD OF INSERT ON point BEGIN
    INSERT INTO scope(task, dataset, metric) SELECT NEW.task, NEW.dataset, NEW.metric
        WHERE NOT EXISTS (SELECT 1 FROM scope WHERE task = NEW.task AND dataset = NEW.dataset
                          AND metric = NEW.metric);
    INSERT INTO point_row(run_id, epoch, model_id, scope_id, accuracy, val_accuracy, loss, duration_ns,
                          accuracy_to_time, elapsed_s)
        VALUES (NEW.run_id, NEW.epoch, NEW.model_id,
                (SELECT id FROM scope WHERE task = NEW.task AND dataset = NEW.dataset AND metric = NEW.metric),
                NEW.accuracy, NEW.val_accuracy, NEW.loss, NEW.duration_ns, NEW.accuracy_to_time, NEW.elapsed_s);
END"""

# A run by its uid (parameters: uid), through run_uid_tail (version 9); the uid itself decides. `+uid`:
# with a plain `uid = ?1` SQLite propagates the constant into substr(uid, -16) and scans the table.
RUN_BY_UID = "substr(uid, -16) = substr(?1, -16) AND +uid = ?1"
# A migration step that is Python, not SQL (a comment to SQLite): migrate() runs PYTHON_STEPS[step].
REBUILD_RUN_UID = "-- zoo.schema: rebuild run without UNIQUE(uid)"

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
    # version 5 (calib): device calibration (lemur_agent_server.evaluator.calibration), so that training times
    # from different machines share one scale: the fixed reference workload's time per device and harness,
    # measured once and reused, and each run's training time expressed on the reference device
    [
        """CREATE TABLE device_calibration (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,         -- sha256 of device_kind, device_name, threads, harness
            device_kind TEXT NOT NULL,        -- cpu | cuda
            device_name TEXT NOT NULL,        -- CPU model and core count, or the GPU's name
            threads INTEGER NOT NULL,         -- torch threads in the sandbox (CPU jobs)
            harness TEXT NOT NULL,            -- backend, image id, runner source hash, workload version
            status TEXT NOT NULL,             -- pending (runs wait for it) | ok | failed (not measured again)
            median_ns INTEGER,                -- median time of one timed block of the workload
            spread REAL,                      -- (max - min) / median over the timed blocks
            times_ns TEXT,                    -- JSON list, one per timed block
            factor REAL,                      -- reference workload ns / median_ns: multiply a duration by it
            detail TEXT,                      -- JSON: what the runner reported, wall time, error
            created REAL NOT NULL
        )""",
        "ALTER TABLE run ADD COLUMN duration_norm_ns INTEGER",  # duration_ns x the device's factor (NULL: none yet)
        "ALTER TABLE run ADD COLUMN calibration_id INTEGER REFERENCES device_calibration(id)",
    ],
    # version 6 (onnx): one weights row per run AND format, so a run keeps its ONNX export (format 'onnx')
    # beside its safetensors; SQLite cannot change a primary key in place, so the table is rebuilt
    [
        """CREATE TABLE weights_by_format (
            run_id INTEGER NOT NULL REFERENCES run(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            path TEXT NOT NULL,               -- relative to the zoo's weights dir
            format TEXT NOT NULL DEFAULT 'safetensors',  -- safetensors | onnx
            PRIMARY KEY (run_id, format)
        )""",
        "INSERT INTO weights_by_format(run_id, sha256, size, path, format) "
        "SELECT run_id, sha256, size, path, format FROM weights",
        "DROP TABLE weights",
        "ALTER TABLE weights_by_format RENAME TO weights",
    ],
    # version 7 (zoosize): a smaller zoo (issue 10: LEMUR's 578k records in <= 150 MB). Measured on a zoo
    # of the 2.1.2 wheel's records, `point` with its indexes held 60 % of the file: every point and every
    # entry of its covering index repeated the task/dataset/metric strings (28 bytes), and four
    # single-column sort indexes copied the table once more.
    # - `scope` holds each (task, dataset, metric) once; `point_row` and `best_point_row` are `point` and
    #   `best_point` with `scope_id` instead of the three strings. `point` and `best_point` become views
    #   with the old columns, so every reader's SQL is unchanged; the INSTEAD OF INSERT trigger on `point`
    #   serves the writers that insert into it (the store, tests); BEST_POINT_UPSERT and the bulk loader
    #   write the tables.
    # - the covering indexes key on scope_id (a byte instead of 28 per entry); the sort index on duration
    #   goes: duration sorts ascending (its default) through COALESCE, which no index serves, so it
    #   served only an unfiltered slowest-first page (that one now scans point_filter).
    # - run_job indexes only runs that have a job (an import's hundreds of thousands of runs have none).
    [
        """CREATE TABLE scope (
            id INTEGER PRIMARY KEY,
            task TEXT NOT NULL,
            dataset TEXT NOT NULL,
            metric TEXT NOT NULL,
            UNIQUE (task, dataset, metric)
        )""",
        "INSERT INTO scope(task, dataset, metric) SELECT task, dataset, metric FROM point UNION"
        " SELECT task, dataset, metric FROM best_point ORDER BY 1, 2, 3",
        """CREATE TABLE point_row (
            run_id INTEGER NOT NULL REFERENCES run(id) ON DELETE CASCADE,
            epoch REAL NOT NULL,
            model_id INTEGER NOT NULL,
            scope_id INTEGER NOT NULL REFERENCES scope(id),
            accuracy REAL,                    -- test accuracy computed by the server
            val_accuracy REAL,
            loss REAL,
            duration_ns INTEGER,              -- cumulative training-only time
            accuracy_to_time REAL,
            elapsed_s REAL,                   -- wall clock since the run started, evaluation included
            created REAL NOT NULL,
            PRIMARY KEY (run_id, epoch)
        ) WITHOUT ROWID""",
        "INSERT INTO point_row(run_id, epoch, model_id, scope_id, accuracy, val_accuracy, loss, duration_ns,"
        " accuracy_to_time, elapsed_s, created) SELECT p.run_id, p.epoch, p.model_id, s.id, p.accuracy,"
        " p.val_accuracy, p.loss, p.duration_ns, p.accuracy_to_time, p.elapsed_s, p.created FROM point p"
        " JOIN scope s ON s.task = p.task AND s.dataset = p.dataset AND s.metric = p.metric"
        " ORDER BY p.run_id, p.epoch",
        """CREATE TABLE best_point_row (
            scope_id INTEGER NOT NULL REFERENCES scope(id),
            epoch REAL NOT NULL,
            model_id INTEGER NOT NULL,
            accuracy REAL NOT NULL,
            duration_ns INTEGER,
            accuracy_to_time REAL,
            created REAL NOT NULL,
            run_id INTEGER NOT NULL,
            PRIMARY KEY (scope_id, epoch, model_id)
        ) WITHOUT ROWID""",
        "INSERT INTO best_point_row(scope_id, epoch, model_id, accuracy, duration_ns, accuracy_to_time, created,"
        " run_id) SELECT s.id, b.epoch, b.model_id, b.accuracy, b.duration_ns, b.accuracy_to_time, b.created,"
        " b.run_id FROM best_point b JOIN scope s ON s.task = b.task AND s.dataset = b.dataset"
        " AND s.metric = b.metric ORDER BY 1, 2, 3",
        "DROP TABLE point",  # with its six indexes
        "DROP TABLE best_point",  # with its three
        POINT_VIEW,
        POINT_INSERT_TRIGGER,
        BEST_POINT_VIEW,
        # best-per-model for one task/dataset/metric/epoch, answered from the index alone
        # (with the primary key run_id, epoch it also covers every sort key of a page)
        "CREATE INDEX point_filter ON point_row(scope_id, epoch, model_id, accuracy, duration_ns, accuracy_to_time,"
        " created)",
        # (model_id, epoch) only: with scope_id in it, SQLite without statistics scans this index with a
        # table lookup per point for an unfiltered page instead of the covering point_filter (10x slower)
        "CREATE INDEX point_model ON point_row(model_id, epoch)",
        "CREATE INDEX point_accuracy ON point_row(accuracy)",
        "CREATE INDEX point_a2t ON point_row(accuracy_to_time)",
        "CREATE INDEX point_created ON point_row(created)",
        "CREATE INDEX best_point_model ON best_point_row(model_id, accuracy)",
        # unique_nn within one task/dataset/metric groups by model without a sort
        "CREATE INDEX best_point_by_model ON best_point_row(scope_id, model_id, accuracy, duration_ns,"
        " accuracy_to_time, created, epoch, run_id)",
        "CREATE INDEX best_point_accuracy ON best_point_row(accuracy)",
        "DROP INDEX run_job",
        "CREATE INDEX run_job ON run(job_id) WHERE job_id IS NOT NULL",
    ],
    # version 8 (repro): what a run needs to be repeated and compared (issue 13): the evaluation protocol
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
    # version 9 (zoosize2): issue 10 again (578k records in <= 150 MB) and a slowest-first page that is fast.
    # Measured on the 2.1.2 wheel's zoo (dbstat), the point indexes held 77 of its 180 MB: the covering
    # point_filter (28 MB) repeated duration, accuracy_to_time and created beside the filter columns, and
    # the sort indexes on accuracy_to_time and created (10.6 MB each) served only unfiltered pages sorted by
    # them; on an imported zoo every point has the same `created`, so that index sorted all the ties anyway.
    # - point_filter keeps the columns a filtered page groups and sorts on by default (scope, epoch, model,
    #   accuracy; the primary key adds run_id): a page reads the other columns for its own rows only
    #   (zoo.query.page_sql); an unfiltered page sorted by accuracy_to_time (or ascending duration) scans the
    #   table, 0.1-0.7 s for 0.6-0.9M points.
    # - newest first walks run_created (created DESC, id: 1.3 MB for 80k runs) and each run's points: a point's
    #   `created` is its run's (both writers store the run's), and the point index on it sorted every tie
    #   of an import (1.8 s) where this one lists them in page order.
    # - the sort indexes are DESC: they list a key's ties in (run_id, epoch) order, a page's own order,
    #   so a slowest-first or best-first page reads 20 entries even among ties (no sort of the tie group);
    #   point_duration is back for the slowest-first page (2 s without it on the wheel's zoo).
    # - best_point_by_model keeps what unique_nn groups on and returns from it (scope, model, accuracy,
    #   run; the primary key adds epoch).
    # - no point_model (7.2 MB on the synthetic 2.2 zoo): a model's points are its runs' points, so a name
    #   or device filter on points goes model -> run_model -> the point primary key (run_id, epoch)
    #   (zoo.query._where(via_run=True)); best_point keeps best_point_model.
    [
        "DROP INDEX point_model",
        "DROP INDEX point_filter",
        "DROP INDEX point_a2t",
        "DROP INDEX point_created",
        "DROP INDEX point_accuracy",
        "DROP INDEX best_point_by_model",
        "CREATE INDEX point_filter ON point_row(scope_id, epoch, model_id, accuracy)",
        "CREATE INDEX point_accuracy ON point_row(accuracy DESC)",
        "CREATE INDEX point_duration ON point_row(duration_ns DESC)",
        "CREATE INDEX best_point_by_model ON best_point_row(scope_id, model_id, accuracy, run_id)",
        "CREATE INDEX run_created ON run(created DESC, id)",
        # no point_row.created / best_point_row.created (6 MB on the synthetic 2.2 zoo): the run's, see
        # POINT_VIEW_V9; the views go first (a dropped column must not be in one), the old indexes on it above
        "DROP VIEW point",
        "DROP VIEW best_point",
        "ALTER TABLE point_row DROP COLUMN created",
        "ALTER TABLE best_point_row DROP COLUMN created",
        # run.uid is no longer UNIQUE (its index of 88-byte LEMUR uids: 8 MB on the synthetic 2.2 zoo): a
        # run is found by RUN_BY_UID through run_uid_tail, an index of the uid's last 16 characters (the
        # trial's md5 or the job/trial/repeat tail), a quarter of the size. Uniqueness is the writers':
        # both (ZooStore.add_run_in, zoo.bulk_load) look a uid up inside their write transaction (SQLite's
        # write lock: no other writer between the look-up and the insert) and insert only a new one.
        REBUILD_RUN_UID,
        "CREATE INDEX run_uid_tail ON run(substr(uid, -16))",
        POINT_VIEW_V9,
        POINT_INSERT_TRIGGER_V9,
        BEST_POINT_VIEW_V9,
    ],
    # version 10 (calib2): a device's speed curve (lemur_agent_server.evaluator.calibration): how much faster
    # than the reference device it runs steps of several work sizes, since that speed-up depends on the
    # step's size (a second CPU thread: 1.4x for a small step, 1.8x for a large one), so a run is
    # normalized at its own work per step. JSON list, one entry per reference workload: {name, work
    # (forward FLOPs per sample x batch), steps, median_ns, spread, iqr, factor}. NULL for rows of
    # workload version 1 (one workload): their runs keep the single `factor`.
    [
        "ALTER TABLE device_calibration ADD COLUMN curve TEXT",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)

# Upsert of one point into best_point: strictly better accuracy wins, so ties keep the first row.
_BEST_POINT_SET = (
    " ON CONFLICT(scope_id, epoch, model_id) DO UPDATE SET accuracy=excluded.accuracy,"
    " duration_ns=excluded.duration_ns, accuracy_to_time=excluded.accuracy_to_time,"
    " run_id=excluded.run_id WHERE excluded.accuracy > best_point_row.accuracy")
# parameters (task, dataset, metric, epoch, model_id, accuracy, duration_ns, accuracy_to_time, run_id);
# the point's scope exists: its point was written first (the point view's trigger adds it)
BEST_POINT_UPSERT = (
    "INSERT INTO best_point_row(scope_id, epoch, model_id, accuracy, duration_ns, accuracy_to_time,"
    " run_id) SELECT s.id, ?4, ?5, ?6, ?7, ?8, ?9 FROM scope s WHERE s.task = ?1 AND s.dataset = ?2"
    " AND s.metric = ?3" + _BEST_POINT_SET)
# the same with the scope's id: (scope_id, epoch, model_id, accuracy, duration_ns, accuracy_to_time,
# run_id), for the bulk loader
BEST_POINT_ROW_UPSERT = (
    "INSERT INTO best_point_row(scope_id, epoch, model_id, accuracy, duration_ns, accuracy_to_time,"
    " run_id) VALUES(?,?,?,?,?,?,?)" + _BEST_POINT_SET)


def rebuild_best_points(conn: sqlite3.Connection) -> int:
    """Recompute best_point from point (after bulk loads that bypass the store). Returns its row count."""
    conn.execute("DELETE FROM best_point_row")
    conn.execute(
        "INSERT INTO best_point_row(scope_id, epoch, model_id, accuracy, duration_ns, accuracy_to_time,"
        " run_id) SELECT scope_id, epoch, model_id, MAX(accuracy), duration_ns, accuracy_to_time, run_id"
        " FROM point_row WHERE accuracy IS NOT NULL GROUP BY scope_id, epoch, model_id")
    return conn.execute("SELECT COUNT(*) FROM best_point_row").fetchone()[0]


def _rebuild_run_uid(conn: sqlite3.Connection) -> None:
    """SQLite's table rebuild (a UNIQUE column constraint cannot be dropped in place) of `run` as it is
    now, whatever columns earlier migrations added: the same DDL less the uid's UNIQUE, its rows, indexes
    and triggers. The views go and come back around it (a rename checks every view). Runs with foreign
    keys off (migrate): dropping the old table must not cascade to the points, weights, ..."""
    ddl = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='run'").fetchone()[0]
    new_ddl, n = re.subn(r"\buid TEXT NOT NULL UNIQUE\b", "uid TEXT NOT NULL", ddl, count=1)
    if n != 1:
        raise RuntimeError("zoo.schema: run.uid is not declared 'uid TEXT NOT NULL UNIQUE'; cannot rebuild run")
    kept = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL AND (type='view'"
                        " OR (type IN ('index', 'trigger') AND tbl_name='run'))"
                        " ORDER BY type != 'view', rowid").fetchall()
    view_triggers = conn.execute("SELECT sql FROM sqlite_master WHERE type='trigger' AND tbl_name IN"
                                 " (SELECT name FROM sqlite_master WHERE type='view') ORDER BY rowid").fetchall()
    for kind, name, _ in kept:
        if kind == "view":
            conn.execute(f'DROP VIEW "{name}"')
    columns = ", ".join(f'"{row[1]}"' for row in conn.execute("PRAGMA table_info(run)"))
    conn.execute(re.sub(r"^CREATE TABLE run\b", "CREATE TABLE run_rebuilt", new_ddl, count=1))
    conn.execute(f"INSERT INTO run_rebuilt({columns}) SELECT {columns} FROM run")
    conn.execute("DROP TABLE run")
    conn.execute("ALTER TABLE run_rebuilt RENAME TO run")
    for _, _, sql in kept:
        conn.execute(sql)
    for (sql,) in view_triggers:
        conn.execute(sql)


PYTHON_STEPS = {REBUILD_RUN_UID: _rebuild_run_uid}


def current_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to SCHEMA_VERSION. Safe to call from several processes at once.

    Foreign keys are off while it runs (a table rebuild drops the old table; SQLite ignores the pragma
    inside a transaction) and checked before the commit; the connection's setting comes back after."""
    foreign_keys = conn.execute("PRAGMA foreign_keys").fetchone()[0]
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        _migrate(conn)
    finally:
        conn.execute(f"PRAGMA foreign_keys={int(foreign_keys)}")
    return SCHEMA_VERSION


def _migrate(conn: sqlite3.Connection) -> None:
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
                step = PYTHON_STEPS.get(statement)
                if step is not None:
                    step(conn)
                else:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(target),),
            )
        broken = conn.execute("PRAGMA foreign_key_check").fetchone()
        if broken:
            raise RuntimeError(f"zoo.schema: the migration left a dangling reference {tuple(broken)}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
