"""The registry on a sqlite MLflow store: versions of a tiny bundle, champion promotion by metric
(also two processes at once), manual promotion, `models:/` URIs in `maskdino predict`, the pyfunc."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.records import Category
from core.storage import Storage
from cli import main
from pipeline.mlflow_tracking import (
    client,
    default_tracking_uri,
    ensure_experiment,
    start_run,
)
from pipeline.model_bundle import open_bundle, save_bundle
from pipeline.model_tools import build_model, load_model_config
from pipeline.registry import (
    CANDIDATE,
    CHAMPION,
    LOCK_SUFFIX,
    RegistryError,
    promote_if_better,
    register_bundle,
    resolve_model_uri,
)
from tests.test_evaluate_cli import COCO_IMAGE, SMALL

ROOT = Path(__file__).resolve().parents[1]
LINEAGE = {"pretrain_run": "run-o365", "train_manifest_sha256": "ab" * 32, "code_version": "0123abc"}


@pytest.fixture(scope="module")
def registry_env(tmp_path_factory) -> tuple[str, str, str]:
    """(tracking URI, run id, bundle folder): a sqlite store and a tiny random instance bundle."""
    root = tmp_path_factory.mktemp("registry")
    cfg = load_model_config("configs/model/tiny_instance.yaml")
    torch.manual_seed(0)
    cats = [Category(100 + i, f"thing{i}", True) for i in range(cfg.num_classes)]
    save_bundle(Storage(), str(root / "bundle"), cfg, build_model(cfg, "cpu", Storage()).state_dict(), cats)
    uri = default_tracking_uri(str(root))
    run = start_run(uri, ensure_experiment(uri, "finetune"), "finetune")
    return uri, run, str(root / "bundle")


def _register(env: tuple[str, str, str], name: str, metric: float) -> str:
    uri, run, bundle = env
    return register_bundle(uri, run, bundle, name, "instance", "mask AP", metric, LINEAGE, Storage())


def _champion(uri: str, name: str) -> str:
    return str(client(uri).get_model_version_by_alias(name, CHAMPION).version)


def test_champion_moves_only_to_a_better_candidate(registry_env):
    uri = registry_env[0]
    v1, v2, v3 = (_register(registry_env, "seq", m) for m in (0.3, 0.2, 0.5))
    tags = client(uri).get_model_version("seq", v3).tags
    assert tags["metric_value"] == "0.5" and tags["task"] == "instance"
    assert tags["lineage.pretrain_run"] == "run-o365" and tags["lineage.code_version"] == "0123abc"
    assert str(client(uri).get_model_version_by_alias("seq", CANDIDATE).version) == v3

    assert promote_if_better(uri, "seq", v1).promoted and _champion(uri, "seq") == v1  # first champion
    worse = promote_if_better(uri, "seq", v2)
    assert not worse.promoted and worse.champion_version == v1 and "does not beat" in worse.reason
    better = promote_if_better(uri, "seq", v3)
    assert better.promoted and _champion(uri, "seq") == v3
    assert not promote_if_better(uri, "seq", v3).promoted  # already champion: no-op


def _promote_after(uri: str, name: str, version: str, barrier) -> bool:
    barrier.wait(timeout=120)
    return promote_if_better(uri, name, version).promoted


@pytest.mark.slow
def test_concurrent_promotions_leave_the_best_champion(registry_env):
    uri = registry_env[0]
    champion = _register(registry_env, "race", 0.3)
    promote_if_better(uri, "race", champion)
    best, second = _register(registry_env, "race", 0.5), _register(registry_env, "race", 0.4)
    ctx = mp.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        # The worse one listed last: a naive read-compare-set lets it overwrite the better one.
        pool.starmap(_promote_after, [(uri, "race", best, barrier), (uri, "race", second, barrier)])
    assert _champion(uri, "race") == best
    assert not [m for m in client(uri).search_registered_models() if m.name.endswith(LOCK_SUFFIX)]


def test_manual_promote_moves_champion_and_records_why(registry_env, capsys):
    uri = registry_env[0]
    good, worse = _register(registry_env, "manual", 0.6), _register(registry_env, "manual", 0.1)
    promote_if_better(uri, "manual", good)
    assert main(["promote", "manual", worse, "--reason", "rollback: v1 crashes on RGBA", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"version {worse}" in out[0]
    assert _champion(uri, "manual") == worse
    tags = client(uri).get_model_version("manual", worse).tags
    assert tags["promotion_reason"] == "rollback: v1 crashes on RGBA" and tags["promoted_by"] and tags["promoted_at"]
    assert main(["promote", "manual", "99", "--reason", "x", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models:/manual/99 not found" in err[0]


def test_resolve_errors_are_one_line_with_the_fix(registry_env, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RegistryError, match="set MLFLOW_TRACKING_URI"):
        resolve_model_uri(None, "models:/seq@champion", str(tmp_path))
    with pytest.raises(RegistryError, match="expected models:/NAME@ALIAS"):
        resolve_model_uri(registry_env[0], "models:/a/b/c", str(tmp_path))
    with pytest.raises(RegistryError, match="no version of 'nobody' has the alias"):
        resolve_model_uri(registry_env[0], "models:/nobody@champion", str(tmp_path))


def test_predict_and_open_bundle_take_models_uris(registry_env, tmp_path, monkeypatch, capsys):
    uri = registry_env[0]
    version = _register(registry_env, "e2e", 0.4)
    promote_if_better(uri, "e2e", version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "pictures"
    assert main(["predict", str(COCO_IMAGE), "--model", "models:/e2e@champion", "--output", str(out),
                 "--score-threshold", "0", *SMALL]) == 0
    assert (out / "000000039769.instances.png").stat().st_size > 0
    assert "models:/e2e@champion" in capsys.readouterr().out
    bundle = open_bundle(Storage(), model=f"models:/e2e/{version}")
    assert bundle.source == f"models:/e2e/{version}" and bundle.dataset_category_ids()[0] == 100


def test_a_models_uri_download_is_removed_when_the_process_exits(registry_env, tmp_path):
    version = _register(registry_env, "cleanup", 0.4)
    script = ("import sys; from core.storage import Storage; from pipeline.model_bundle import open_bundle; "
              "b = open_bundle(Storage(), model=sys.argv[1]); print(b.weights)")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry_env[0], "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script, f"models:/cleanup/{version}"], check=False, env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    weights = Path(done.stdout.strip().splitlines()[-1])
    assert weights.name == "model.safetensors" and weights.is_relative_to(tmp_path)  # it was downloaded there
    assert not weights.exists() and not list(tmp_path.glob("maskdino-registry-*"))


def test_pyfunc_loads_and_predicts_on_images(registry_env, monkeypatch):
    import mlflow.pyfunc

    version = _register(registry_env, "pyfunc", 0.4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_env[0])
    model = mlflow.pyfunc.load_model(f"models:/pyfunc/{version}")
    images = [np.zeros((60, 90, 3), np.uint8), np.full((48, 48, 3), 200, np.uint8)]
    results = model.predict(images)
    assert len(results) == 2
    for result in results:
        n = len(result["scores"])
        assert result["boxes"].shape == (n, 4) and result["classes"].shape == (n,)
        assert set(result["category_ids"].tolist()) <= set(range(100, 100 + 200))
        assert len(result["labels"]) == n
    source = Path(client(registry_env[0]).get_model_version_download_uri("pyfunc", version))
    assert not list(source.rglob("*.pkl"))  # model from code: nothing pickled
    assert sorted(p.name for p in (source / "artifacts").iterdir()) == ["categories.json", "config.yaml",
                                                                        "model.safetensors"]
