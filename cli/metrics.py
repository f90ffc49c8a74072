"""`metrics pq|miou|coco`: score prediction files in the standard formats (from any codebase) and print
one JSON object."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.args import add_command
from core.config import ConfigError
from pipeline.metrics.panoptic import evaluate_panoptic_folders
from pipeline.metrics.semantic import evaluate_semantic_folders


def add_metrics(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "metrics", "score prediction files in the standard formats (from any codebase); prints one "
                    "JSON object",
                    required="METRIC (pq, miou or coco) and its files: maskdino metrics METRIC --help",
                    example="maskdino metrics coco --gt-json instances_val2017.json --results segm_results.json "
                            "--iou-type segm")
    kinds = p.add_subparsers(dest="metric", metavar="METRIC", required=True)
    pq = add_command(kinds, "pq", "panoptic quality: COCO panoptic JSON + PNG folders (panopticapi rules)",
                     required="--gt-json, --gt-folder, --pred-json, --pred-folder",
                     example="maskdino metrics pq --gt-json panoptic_val2017.json --gt-folder panoptic_val2017 "
                             "--pred-json pred.json --pred-folder pred/")
    pq.add_argument("--gt-json", required=True)
    pq.add_argument("--gt-folder", required=True)
    pq.add_argument("--pred-json", required=True)
    pq.add_argument("--pred-folder", required=True)
    pq.add_argument("--workers", type=int, default=2, help="images scored at once (threads)")
    pq.set_defaults(run=run_pq)
    miou = add_command(kinds, "miou", "mIoU, fwIoU, mACC, pACC of label-map PNGs matched by file name (detectron2 "
                       "convention, 255 = ignore)",
                       required="--gt-folder, --pred-folder, --num-classes",
                       example="maskdino metrics miou --gt-folder ADE/annotations/validation --pred-folder preds/ "
                               "--num-classes 150 --reduce-zero-label")
    miou.add_argument("--gt-folder", required=True)
    miou.add_argument("--pred-folder", required=True)
    miou.add_argument("--num-classes", type=int, required=True)
    miou.add_argument("--reduce-zero-label", action="store_true",
                      help="ADE20K format: 0 = other (ignored), classes 1..K become 0..K-1, in both folders")
    miou.add_argument("--class-names", default="", help="text file with one class name per line (optional)")
    miou.set_defaults(run=run_miou)
    cc = add_command(kinds, "coco", "COCO box or mask AP through pycocotools COCOeval",
                     required="--gt-json, --results",
                     example="maskdino metrics coco --gt-json instances_val2017.json --results segm_results.json "
                             "--iou-type segm")
    cc.add_argument("--gt-json", required=True, help="COCO instances JSON")
    cc.add_argument("--results", required=True, help="COCO results JSON (a list of detections)")
    cc.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    cc.set_defaults(run=run_coco)


def print_json(report: dict) -> None:
    print(json.dumps(report, indent=None, sort_keys=False))


def run_pq(args: argparse.Namespace) -> int:
    report = evaluate_panoptic_folders(args.gt_json, args.gt_folder, args.pred_json, args.pred_folder,
                                       workers=args.workers, progress=True)
    print_json(report.to_json())
    return 0


def run_miou(args: argparse.Namespace) -> int:
    names = None
    if args.class_names:
        names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
        if len(names) != args.num_classes:
            raise ConfigError(f"--class-names {args.class_names} has {len(names)} names for --num-classes "
                              f"{args.num_classes}")
    report = evaluate_semantic_folders(args.gt_folder, args.pred_folder, args.num_classes,
                                       reduce_zero_label=args.reduce_zero_label, class_names=names, progress=True)
    print_json(report.to_json())
    return 0


def run_coco(args: argparse.Namespace) -> int:
    from pipeline.metrics.coco import evaluate_coco_files  # heavy: pycocotools

    report = evaluate_coco_files(args.gt_json, args.results, args.iou_type)
    print_json(report.to_json())
    return 0
