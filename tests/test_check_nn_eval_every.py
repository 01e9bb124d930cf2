"""check_nn's `eval_every`: one curve point per epoch, as LEMUR records, when asked (one evaluation pass less)."""

from pathlib import Path

from lemur_agent_server import api
from lemur_agent_server.reference_models import read_code

PRM = {"lr": 0.05, "momentum": 0.9, "batch": 32, "transform": "norm_32", "epoch": 2}


def test_check_nn_eval_every_one_epoch(tmp_path: Path, data_root: Path, monkeypatch):
    monkeypatch.setenv("LEMUR_DATA", str(data_root))
    zoo = tmp_path / "zoo.sqlite"
    name = api.check_nn(read_code("LeNet5"), "img-classification", "digits", "acc", dict(PRM), prefix="ev",
                        zoo=zoo, sandbox="process", eval_every=1.0)[0]
    frame = api.data(zoo=zoo)
    frame = frame[frame["nn_id"] == name.removeprefix("ev-")]
    assert sorted(frame["epoch"]) == [1.0, 2.0]
