"""`nn_stat_data()`, `run_data()`, `prun_data()` and `data(include_nn_stats=True)` over the tables that
importing a LEMUR 2.2 database fills (fixture: tests/lemur_fixture.py), with LEMUR 2.2.11's columns;
and the query filter `device_type` over LEMUR's mobile benchmarks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pandas as pd
import pytest

from lemur_agent_server import api, api_tables
from tests import lemur_fixture as fx
from zoo import connection
from zoo.query import Filters, Page
from zoo.store import ZooStore


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lemur_tables")
    return fx.import_fixture(root / "zoo.sqlite", root / "lemur")


def lemur_row(columns: list[str], values: dict, **renamed) -> dict:
    """What LEMUR's reader gives for a source row: every column, None where the row had none."""
    return {c: values.get(renamed.get(c, c)) for c in columns}


def test_nn_stat_data_has_the_imported_rows_under_lemur_names(zoo: Path):
    frame = api.nn_stat_data(zoo=zoo)
    assert list(frame.columns) == api_tables.NN_STAT_DATA_COLUMNS
    records = frame.to_dict("records")
    assert [r["id"] for r in records] == ["ns-bad", "ns-good"]  # by model name, then LEMUR's id
    good = records[1]
    expected = lemur_row(api_tables.NN_STAT_DATA_COLUMNS, fx.NN_STAT_GOOD)
    expected["meta"] = {"input": [1, 3, 32, 32]}
    assert {k: (None if v != v else v) for k, v in good.items()} == expected  # NaN (a float column's None)
    assert records[0]["error"] == "CUDA out of memory" and records[0]["meta"] is None
    assert api.nn_stat_data(nn_name="TinyNet", prm_id="pa", zoo=zoo)["id"].tolist() == ["ns-good"]
    assert api.nn_stat_data(nn_name="WideNet", zoo=zoo).empty
    assert len(api.nn_stat_data(max_rows=1, zoo=zoo)) == 1


def test_run_data_merges_each_benchmark_with_its_models_tflite_row(zoo: Path):
    frame = api.run_data(zoo=zoo)
    assert list(frame.columns) == api_tables.RUN_DATA_COLUMNS
    runs = {r["id"]: r for r in frame.astype(object).where(frame.notna(), None).to_dict("records")}
    assert list(runs) == ["mr-galaxy", "mr-pixel", "mr-wide"]
    pixel = runs["mr-pixel"]
    expected = lemur_row(api_tables.RUN_DATA_COLUMNS, fx.RUN_PIXEL)
    expected.update(device_analytics={"soc": "Tensor G2"}, tflite_id="tf-tiny", tflite_accuracy=0.49,
                    tflite_transform="norm_32", tflite_precision_type="int8")
    assert pixel == expected
    assert (runs["mr-galaxy"]["valid"], runs["mr-galaxy"]["error_message"]) == (0, "delegate failed")
    assert runs["mr-galaxy"]["tflite_id"] == "tf-tiny"
    assert runs["mr-wide"]["tflite_id"] is None and runs["mr-wide"]["precision_type"] == "fp16"
    assert api.run_data(device_type="Pixel 7", zoo=zoo)["id"].tolist() == ["mr-pixel", "mr-wide"]
    assert api.run_data(model_name="WideNet", device_type="Galaxy S23", zoo=zoo).empty


def test_prun_data_filters_like_lemur(zoo: Path):
    frame = api.prun_data(zoo=zoo)
    assert list(frame.columns) == api_tables.PRUN_DATA_COLUMNS
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    assert records == [lemur_row(api_tables.PRUN_DATA_COLUMNS, fx.PRUN_TINY),
                       lemur_row(api_tables.PRUN_DATA_COLUMNS, fx.PRUN_WIDE)]
    assert api.prun_data(pruning_method="random", zoo=zoo)["model_name"].tolist() == ["WideNet"]
    assert len(api.prun_data(task_dataset="img-classification_cifar-10", zoo=zoo)) == 2
    assert api.prun_data("TinyNet", "random", zoo=zoo).empty


def test_data_with_nn_stats_reads_the_good_imported_row(zoo: Path):
    frame = api.data(task="img-classification", dataset="cifar-10", include_nn_stats=True, zoo=zoo)
    by_model = {nn: rows for nn, rows in frame.groupby("nn")}
    tiny = by_model["TinyNet"].iloc[-1]
    assert (tiny["epoch"], tiny["accuracy"]) == (2.0, 0.7)
    assert (tiny["nn_total_params"], tiny["nn_flops"], tiny["nn_max_depth"], tiny["nn_has_residual"],
            tiny["nn_trainable_params"], tiny["nn_code_length"]) == (1234, 56789, 3, 1, 1200, 321)
    assert tiny["nn_stats_meta"] == {"input": [1, 3, 32, 32]} and tiny["nn_stats_error"] is None
    wide = by_model["WideNet"].iloc[0]
    assert pd.isna(wide["nn_max_depth"]) and wide["nn_stats_meta"] is None  # no nn_stat row: unknown
    assert wide["nn_code_length"] == len(wide["nn_code"])                    # ours, from the code


def test_empty_zoo_gives_empty_frames_with_lemur_columns(tmp_path: Path):
    missing = tmp_path / "none.sqlite"
    empty = tmp_path / "empty.sqlite"
    connection.initialize(empty)
    old = tmp_path / "old.sqlite"   # a zoo from before schema version 2: no lemur_* tables
    connection.initialize(old)
    with sqlite3.connect(old) as conn:
        for table in ("lemur_nn_stat", "lemur_mobile_run", "lemur_tflite", "lemur_prun"):
            conn.execute(f"DROP TABLE {table}")
    for zoo in (missing, empty, old):
        for reader, columns in ((api.nn_stat_data, api_tables.NN_STAT_DATA_COLUMNS),
                                (api.run_data, api_tables.RUN_DATA_COLUMNS),
                                (api.prun_data, api_tables.PRUN_DATA_COLUMNS)):
            frame = reader(zoo=zoo)
            assert frame.empty and list(frame.columns) == columns, (zoo.name, reader.__name__)
    assert not missing.exists()


def test_query_filter_device_type_keeps_models_benchmarked_there(zoo: Path):
    async def names(**filters) -> list[str]:
        store = await ZooStore.open(zoo)
        try:
            result = await store.query(Filters(**filters), Page(sort="name", limit=100))
        finally:
            await store.close()
        return [r["name"] for r in result["rows"]]

    assert anyio.run(lambda: names(dataset="cifar-10")) == ["TinyNet", "TinyNet", "WideNet"]
    assert anyio.run(lambda: names(device_type="Pixel 7", unique_nn=True)) == ["TinyNet", "WideNet"]
    assert anyio.run(lambda: names(device_type="Galaxy S23")) == ["TinyNet", "TinyNet"]
    assert anyio.run(lambda: names(device_type="Galaxy S23", nn=("WideNet",))) == []
    assert anyio.run(lambda: names(device_type="iPhone")) == []
    assert Filters(device_type="Pixel 7").digest() != Filters().digest()  # a cursor keeps its device
