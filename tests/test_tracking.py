"""Tests for pipeline.tracking: JSONL/console/null/multi loggers, params redaction, step metrics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from core.storage import Storage
from pipeline import tracking
from core.config import config_to_dict
from pipeline.tracking import (
    ConsoleLogger,
    JsonlLogger,
    MultiLogger,
    NullLogger,
    StepMetrics,
    flatten_config,
    make_logger,
    peak_memory_mb,
    redact,
)


@dataclasses.dataclass
class _StorageCfg:
    endpoint_url: str = "https://alice:hunter2@minio.local:9000/path"
    secret_access_key: str = "AKIA-very-secret"
    bucket: str = "runs"


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-4
    sizes: tuple[int, ...] = (480, 512)
    storage: _StorageCfg = dataclasses.field(default_factory=_StorageCfg)
    extra: dict = dataclasses.field(default_factory=lambda: {"hub_token": "tok123", "depth": {"n": 3}})


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def log_params(self, params):
        self.calls.append(("params", dict(params)))

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", dict(metrics), step))

    def log_artifact(self, name, data):
        self.calls.append(("artifact", name, data))

    def close(self):
        self.calls.append(("close",))


def test_jsonl_lines_parse_and_contain_step_and_every_metric(tmp_path):
    lg = JsonlLogger(str(tmp_path / "run"), Storage())
    metrics = [{"loss/total": 2.5, "lr/default": 1e-4}, {"loss/total": float("nan"), "grad_norm": float("inf")}]
    for step, m in enumerate(metrics, start=1):
        lg.log_metrics(m, step)
    lg.close()
    rows = _lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(isinstance(r["time"], float) and r["time"] > 1e9 for r in rows)
    assert rows[0]["loss/total"] == 2.5 and rows[0]["lr/default"] == 1e-4
    # Non-finite values survive as strings that float() reads back; the line stays strict JSON.
    assert math.isnan(float(rows[1]["loss/total"])) and float(rows[1]["grad_norm"]) == math.inf
    with pytest.raises(ValueError, match="reserved"):
        JsonlLogger(str(tmp_path / "other"), Storage()).log_metrics({"step": 1.0}, 1)


def test_jsonl_local_resume_appends(tmp_path):
    for step in (1, 2):
        with JsonlLogger(str(tmp_path), Storage()) as lg:
            lg.log_metrics({"loss/total": float(step)}, step)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_params_flattened_and_secrets_redacted(tmp_path):
    flat = flatten_config(_Cfg())
    assert flat["lr"] == 1e-4
    assert flat["sizes"] == "[480, 512]"  # lists as JSON strings
    assert flat["extra.depth.n"] == 3
    assert flat["storage.secret_access_key"] == "AKIA-very-secret"  # flattening alone keeps values

    safe = redact(flat)
    assert safe["storage.secret_access_key"] == "***"
    assert safe["extra.hub_token"] == "***"
    assert safe["storage.endpoint_url"] == "https://alice:***@minio.local:9000/path"
    assert safe["storage.bucket"] == "runs" and safe["lr"] == 1e-4
    assert redact({"u": "s3://tok@host/x"})["u"] == "s3://***@host/x"  # bare userinfo: a token

    # The logger redacts on its own, even when handed the raw nested config.
    with JsonlLogger(str(tmp_path), Storage()) as lg:
        lg.log_params(config_to_dict(_Cfg()))
    text = (tmp_path / "params.json").read_text()
    assert "hunter2" not in text and "AKIA-very-secret" not in text and "tok123" not in text
    assert json.loads(text) == safe


def test_artifacts_written(tmp_path):
    with JsonlLogger(str(tmp_path), Storage()) as lg:
        lg.log_artifact("config.yaml", b"lr: 0.0001\n")
        lg.log_artifact("reports/eval.json", b'{"AP": 41.2}')
        with pytest.raises(ValueError):
            lg.log_artifact("../escape.txt", b"x")
    assert (tmp_path / "artifacts" / "config.yaml").read_bytes() == b"lr: 0.0001\n"
    assert json.loads((tmp_path / "artifacts" / "reports" / "eval.json").read_text()) == {"AP": 41.2}
    assert not (tmp_path / "escape.txt").exists()


def test_null_logger_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "rank_and_world", lambda: (1, 2))
    lg = make_logger(str(tmp_path / "run"), max_steps=10, storage=Storage(), print_every=1)
    assert isinstance(lg, NullLogger)
    lg.log_params({"a": 1})
    lg.log_metrics({"loss/total": 1.0}, 1)
    lg.log_artifact("x.txt", b"x")
    lg.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_multi_logger_fans_out(tmp_path):
    a, b = _Recorder(), _Recorder()
    with MultiLogger(a, b) as lg:
        lg.log_params({"x": 1})
        lg.log_metrics({"loss/total": 0.5}, 3)
        lg.log_artifact("r.txt", b"r")
    expected = [("params", {"x": 1}), ("metrics", {"loss/total": 0.5}, 3), ("artifact", "r.txt", b"r"), ("close",)]
    assert a.calls == expected and b.calls == expected

    rank0 = make_logger(str(tmp_path), max_steps=5, storage=Storage())
    assert isinstance(rank0, MultiLogger)
    assert [type(x) for x in rank0.loggers] == [ConsoleLogger, JsonlLogger]
    rank0.log_metrics({"loss/total": 1.0}, 1)
    rank0.close()
    assert _lines(tmp_path / "metrics.jsonl")[0]["loss/total"] == 1.0


@pytest.mark.s3
def test_s3_metrics_jsonl_uploaded_on_flush_and_close(s3_bucket):
    st, bucket = s3_bucket
    run = f"{bucket}/runs/r1"
    lg = JsonlLogger(run, st, flush_every_s=3600)
    for step in range(1, 6):
        lg.log_metrics({"loss/total": 1.0 / step}, step)
    assert not st.exists(f"{run}/metrics.jsonl")  # buffered: nothing uploaded before the interval
    lg.log_params({"storage": {"secret_access_key": "abc"}})
    lg.log_artifact("notes.txt", b"hello")
    lg.close()
    rows = [json.loads(line) for line in st.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss/total"] == pytest.approx(0.2)
    assert json.loads(st.read_bytes(f"{run}/params.json")) == {"storage.secret_access_key": "***"}
    assert st.read_bytes(f"{run}/artifacts/notes.txt") == b"hello"

    # A resumed run keeps the earlier lines; flush_every_s=0 uploads on every call.
    with JsonlLogger(run, st, flush_every_s=0) as again:
        again.log_metrics({"loss/total": 0.1}, 6)
        mid = st.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in mid] == [1, 2, 3, 4, 5, 6]


def test_step_metrics_as_dict_names():
    sm = StepMetrics(
        losses={"loss_ce": 1.0, "loss_mask": 0.5, "loss_dice": 0.25},
        lr_by_group={"default": 1e-4, "backbone": 1e-5},
        grad_norm=3.0,
        images_per_s=12.5,
        data_wait_fraction=0.1,
        peak_memory_mb=2048.0,
    )
    d = sm.as_dict()
    assert d == {
        "loss/loss_ce": 1.0,
        "loss/loss_mask": 0.5,
        "loss/loss_dice": 0.25,
        "loss/total": 1.75,
        "lr/default": 1e-4,
        "lr/backbone": 1e-5,
        "grad_norm": 3.0,
        "images_per_s": 12.5,
        "data_wait_fraction": 0.1,
        "peak_memory_mb": 2048.0,
    }
    no_grad = dataclasses.replace(sm, grad_norm=None, losses={"a": 1.0, "total": 9.0}).as_dict()
    assert "grad_norm" not in no_grad and no_grad["loss/total"] == 9.0  # a reported total is kept


def test_peak_memory_mb_positive_on_cpu():
    mb = peak_memory_mb("cpu")
    assert 1.0 < mb < 1e6  # a Python process with torch loaded: tens to hundreds of MiB
    assert peak_memory_mb(torch.device("cpu")) >= mb


def test_console_logger_plain_line_every_print_every(capsys):
    lg = ConsoleLogger(max_steps=100, print_every=10)
    for step in range(1, 36):
        lg.log_metrics({"loss/total": 0.5, "lr/default": 1e-4, "lr/backbone": 1e-5,
                        "images_per_s": 8.0, "data_wait_fraction": 0.25}, step)
    lg.close()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert lines == [f"step {s}/100 loss 0.5000 lr 1.00e-04 images/s 8.0 data-wait 25%" for s in (10, 20, 30)]
