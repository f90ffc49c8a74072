"""`promote`: move a registered model's `champion` alias by hand (MLflow), recording why."""
from __future__ import annotations

import argparse

from cli.args import add_command


def add_promote(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "promote", "manually move the `champion` alias of a registered model to VERSION (MLflow "
                    "registry); the reason is recorded on the version",
                    details=[("`maskdino run` moves `champion` only when a candidate beats it on the task's metric; "
                              "this overrides that by hand, recording who, why and when as version tags.")],
                    required="NAME, VERSION and --reason TEXT; the registry from --tracking-uri or "
                             "$MLFLOW_TRACKING_URI",
                    example='maskdino promote maskdino-demo-instance 2 --reason "better on the customer set" '
                            "--tracking-uri sqlite:///demo_out/pipeline/mlflow.db")
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="model version number")
    p.add_argument("--reason", required=True, help="why (stored as the version tag promotion_reason)")
    p.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.set_defaults(run=run_promote)


def run_promote(args: argparse.Namespace) -> int:
    from pipeline.registry import promote  # heavy: mlflow

    result = promote(args.tracking_uri or None, args.name, args.version, args.reason)
    print(f"models:/{args.name}@champion -> version {result.champion_version} ({result.reason})")
    return 0
