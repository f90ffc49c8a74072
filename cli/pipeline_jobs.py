"""The staged pipeline: `run` (shard -> pretrain -> fine-tune -> evaluate -> register on Ray, tracked in
MLflow) and the Ray Jobs commands that send it to a cluster: `submit` and `jobs list|status|logs|stop`."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence

from cli.args import CommandParser, add_address, add_command, add_overrides
from orchestration import jobs

_ADDRESS_NEEDED = "the head's dashboard address (--address, $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"
_JOBS_NOTE = ("Exit codes: 0 SUCCEEDED (or still PENDING/RUNNING for `jobs status`, or not waited for), 1 FAILED, "
              "2 user error (no address, no Ray head answering, unknown job, bad argument), 3 STOPPED, "
              "4 still PENDING after --pending-timeout (the cluster lacks the requested resources?), "
              "5 still running after --timeout. Address: --address, else $RAY_API_SERVER_ADDRESS, else "
              "$RAY_ADDRESS (the head's dashboard, http://HOST:8265; keep it on 127.0.0.1 behind an SSH tunnel).")


# ---------------------------------------------------------------- run
def add_run(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "run", "run a staged pipeline (shard -> pretrain -> fine-tune -> evaluate -> register) on "
                    "Ray, tracked in MLflow; cached stages are skipped",
                    details=[("A stage's key hashes its resolved config, the code version and its inputs' keys; a "
                              "stage whose output under RUN_ROOT/stages/<stage>/<key>/ is complete is skipped, so a "
                              "second run skips everything and a changed config reruns that stage and the stages that "
                              "depend on it. --dry-run validates every config and prints the plan.")],
                    required="PIPELINE, a pipeline config (configs/pipeline/*.yaml)",
                    example="maskdino run configs/pipeline/demo.yaml --dry-run")
    p.add_argument("pipeline", help="pipeline config (configs/pipeline/*.yaml)")
    add_overrides(p, "pipeline overrides", "run_root=/data/run")
    p.add_argument("--dry-run", action="store_true", help="validate every config and print the plan, run nothing")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE and the stages that depend on it, even when cached (repeatable)")
    p.set_defaults(run=run_run)


def run_run(args: argparse.Namespace) -> int:
    from orchestration.run_pipeline import run_pipeline  # heavy: ray, torch

    outcome = run_pipeline(args.pipeline, force=tuple(args.force), dry_run=args.dry_run,
                           overrides=tuple(args.overrides))
    return 0 if outcome is None or outcome.ok else 1


# ---------------------------------------------------------------- submit
class SubmitParser(CommandParser):
    """Everything after `--` goes to `extra` (a `nargs="*"` positional after the pipeline would match empty
    before the options and leave `-- ARGS` unrecognised)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        extra = args[args.index("--") + 1:] if "--" in args else []
        args = args[:args.index("--")] if "--" in args else args
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.extra = extra
        return namespace, rest


def add_submit(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "submit", "submit `maskdino run PIPELINE` to a Ray cluster as a Ray job (the project folder "
                    "is uploaded as its working_dir); prints the job id",
                    details=[_JOBS_NOTE],
                    required=f"PIPELINE.yaml inside the working_dir; {_ADDRESS_NEEDED}",
                    example="maskdino submit configs/pipeline/cluster_example.yaml --address http://127.0.0.1:8265 "
                            "--wait",
                    usage="maskdino submit PIPELINE.yaml [--address URL] [--wait] [options] [-- RUN_ARGS ...]")
    p.__class__ = SubmitParser
    p.add_argument("pipeline", help="pipeline YAML inside the working_dir (default: the project folder); "
                                    "arguments after -- go to `maskdino run`")
    add_address(p)
    p.add_argument("--wait", action="store_true", help="wait for the end, print the job's logs, exit with its code")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after S seconds (exit 5)")
    p.add_argument("--pending-timeout", type=float, default=300.0,
                   help="with --wait: give up when the job is still PENDING after S seconds (exit 4; default 300)")
    p.add_argument("--stop-on-timeout", action="store_true", help="stop the job when a timeout gives up on it")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="job environment (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="PKG", help="pip package for the job (repeatable)")
    p.add_argument("--working-dir", default="", help="folder to upload instead of the project folder")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--entrypoint-resources", default="", help='custom resources for the driver, JSON: \'{"x": 1}\'')
    p.set_defaults(run=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    address = jobs.resolve_address(args.address)
    client = jobs.connect(address)
    try:
        resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
    except ValueError as exc:
        raise jobs.JobsError(f"--entrypoint-resources: not JSON ({exc})") from None
    runtime_env = {"working_dir": args.working_dir} if args.working_dir else None
    job_id = jobs.submit_pipeline(address, args.pipeline, args.extra, runtime_env, client=client,
                                  env_vars=jobs.parse_env_pairs(args.env), pip=args.pip,
                                  submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
                                  entrypoint_num_gpus=args.entrypoint_num_gpus, entrypoint_resources=resources)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    outcome = jobs.wait_job(address, job_id, timeout_s=args.timeout, pending_timeout_s=args.pending_timeout,
                            stop_on_timeout=args.stop_on_timeout, client=client)
    if outcome.status != jobs.PENDING_TIMEOUT:
        for chunk in jobs.job_logs(address, job_id, client=client):
            print(chunk, end="" if chunk.endswith("\n") or not chunk else "\n")
    print(outcome.line(), flush=True)
    return outcome.exit_code


# ---------------------------------------------------------------- jobs
def add_jobs(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "jobs", "list, inspect, follow and stop Ray jobs", details=[_JOBS_NOTE],
                    required=f"ACTION (list, status, logs or stop); {_ADDRESS_NEEDED}",
                    example="maskdino jobs list --address http://127.0.0.1:8265")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = add_command(actions, "list", "every job the cluster knows: id, status, start time, entrypoint",
                     required=_ADDRESS_NEEDED, example="maskdino jobs list --address http://127.0.0.1:8265")
    add_address(ls)
    ls.set_defaults(run=run_jobs_list)
    st = add_command(actions, "status", "a job's status; exit code as in `maskdino submit --wait`",
                     details=[_JOBS_NOTE], required=f"JOB_ID; {_ADDRESS_NEEDED}",
                     example="maskdino jobs status raysubmit_XYZ --address http://127.0.0.1:8265")
    st.add_argument("job_id")
    add_address(st)
    st.set_defaults(run=run_jobs_status)
    lg = add_command(actions, "logs", "a job's output (with --follow: until the job ends)",
                     required=f"JOB_ID; {_ADDRESS_NEEDED}",
                     example="maskdino jobs logs raysubmit_XYZ --address http://127.0.0.1:8265 --follow")
    lg.add_argument("job_id")
    add_address(lg)
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    lg.set_defaults(run=run_jobs_logs)
    sp = add_command(actions, "stop", "stop a job", details=[_JOBS_NOTE], required=f"JOB_ID; {_ADDRESS_NEEDED}",
                     example="maskdino jobs stop raysubmit_XYZ --address http://127.0.0.1:8265 --wait")
    sp.add_argument("job_id")
    add_address(sp)
    sp.add_argument("--wait", action="store_true", help="wait until it has ended; exit with its code (3 STOPPED)")
    sp.add_argument("--timeout", type=float, default=60.0, help="with --wait: give up after S seconds (exit 5)")
    sp.set_defaults(run=run_jobs_stop)


def run_jobs_list(args: argparse.Namespace) -> int:
    for job in jobs.list_jobs(args.address):
        started = (datetime.datetime.fromtimestamp(job.start_time / 1000).isoformat(timespec="seconds")
                   if job.start_time else "-")
        entrypoint = job.entrypoint if len(job.entrypoint) <= 80 else job.entrypoint[:77] + "..."
        print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{started}\t{entrypoint}")
    return 0


def run_jobs_status(args: argparse.Namespace) -> int:
    info = jobs.job_info(args.address, args.job_id)
    status = info.status.value
    message = (info.message or "").strip().splitlines()
    print(f"{args.job_id}\t{status}" + (f"\t{message[0]}" if message else ""))
    return jobs.EXIT_CODES[status]


def run_jobs_logs(args: argparse.Namespace) -> int:
    for chunk in jobs.job_logs(args.address, args.job_id, follow=args.follow):
        print(chunk, end="", flush=True)
    return 0


def run_jobs_stop(args: argparse.Namespace) -> int:
    address = jobs.resolve_address(args.address)
    client = jobs.connect(address)
    pending = jobs.job_status(address, args.job_id, client=client) == "PENDING"
    requested = jobs.stop_job(address, args.job_id, client=client)
    if not args.wait or pending:
        print(f"job {args.job_id}: " + ("stop requested" if requested else "had already ended")
              + (f"; {jobs.PENDING_STOP_NOTE}" if pending else ""))
        return 0
    outcome = jobs.wait_job(address, args.job_id, timeout_s=args.timeout, client=client)
    print(outcome.line())
    return outcome.exit_code
