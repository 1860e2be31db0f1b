"""The `mirror` command: parses arguments and calls library functions."""
from __future__ import annotations

import argparse
import os
import sys

from mirror_core.config import ALIGNMENT_MODES
from mirror_core.errors import error_text
from pipeline.scan.config import ConfigError

SCAN_FLAGS = {  # flag -> (ScanConfig field, type, help)
    "--batch-size": ("batch_size", int, "images per model call"),
    "--actors": ("actors", int, "scoring actors (model replicas)"),
    "--max-actors": ("max_actors", int, "autoscale the actor pool up to this many (default: a fixed pool of --actors)"),
    "--gpus-per-actor": ("gpus_per_actor", float, "GPUs per scoring actor (0 = CPU)"),
    "--cpus-per-actor": ("cpus_per_actor", float, "CPUs per scoring actor (default: 1 on GPU; on a one-node CPU Ray its CPUs less 2, shared)"),
    "--cpus-per-decode-task": ("cpus_per_decode_task", float, "CPUs per decode task"),
    "--fetch-threads": ("fetch_threads", int, "concurrent reads per decode task"),
    "--unit-size": ("unit_size", int, "records per committed unit (folders, manifests)"),
    "--threshold": ("threshold", float, "decision threshold on prob_fake (default: the bundle's)"),
    "--precision": ("precision", str, "fp32 | bf16 | fp16 (autocast) | bf16-weights | bf16-gelu-tanh, fp8 (not exact) (default: bf16 on GPU, fp32 on CPU)"),
    "--input-format": ("input_format", str, "auto | folder | parquet | manifest | webdataset (tar or zip shards)"),
    "--address": ("address", str, "Ray cluster address (default: RAY_ADDRESS, else local Ray)"),
}

# Boolean scan settings: flag -> (ScanConfig field, help).
SCAN_SWITCHES = {
    "--fast-decode": ("fast_decode", "decode large JPEGs at reduced DCT scale: not bit-exact, recorded in every "
                                     "row; faster only where the exact path's JPEG region decoder is not built"),
    "--gpu-decode": ("gpu_decode", "decode, resize and crop JPEGs on the scoring replicas' GPUs (needs the "
                                   "gpu-decode extra; other formats take the CPU path): not bit-exact, recorded in "
                                   "every row"),
    "--update": ("update", "re-list the input; files, shards or records added since the first run become new "
                           "units and are scored now; a folder's files or Parquet shards changed in place or removed "
                           "since are found by their versions and their units scored again"),
    "--retry-errors": ("retry_errors", "score again the units holding rows whose read failed (storage errors), "
                                       "replacing their parts; undecodable images stay errors"),
    "--compile": ("compile", "torch.compile each scoring replica: slower start, faster steady state on GPU"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_scan_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """The scan's settings as flags (`only`: these of SCAN_FLAGS and SCAN_SWITCHES, for a
    command that uses a few), with --config and --alignment."""
    from pipeline.scan.config import ScanConfig

    # The flags default to None ("not given") so a YAML value survives; the help shows
    # what applies when neither says anything.
    defaults = ScanConfig()
    p.add_argument("--config", help="YAML settings (see configs/); flags override it")
    for flag, (field, kind, help_text) in SCAN_FLAGS.items():
        if only is None or flag in only:
            shown = "" if "default" in help_text else f" (default: {getattr(defaults, field)})"
            p.add_argument(flag, type=kind, help=help_text + shown)
    p.add_argument("--alignment", choices=ALIGNMENT_MODES, help="JPEG q96 alignment policy (default: the bundle's)")
    if only is None:
        p.add_argument("--label-folders", help=LABEL_FOLDERS_HELP)
        p.add_argument("--extensions", help="image file extensions of folder inputs, comma-separated; '*': every "
                                            "file, names without an extension too "
                                            f"(default: {','.join(defaults.extensions)})")
    for flag, (field, help_text) in SCAN_SWITCHES.items():  # --x / --no-x, off unless YAML or flag says so
        if only is None or flag in only:
            p.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: off)")


def parse_label_folders(text: str | None) -> dict[str, str] | None:
    """'REAL=real,FAKE=fake' -> {'REAL': 'real', 'FAKE': 'fake'} (None: not given)."""
    if not text:
        return None
    pairs = [p.partition("=") for p in text.split(",") if p.strip()]
    bad = [name for name, eq, value in pairs if not eq or not name.strip() or not value.strip()]
    if bad:
        raise ConfigError(f"--label-folders {text!r}: expected NAME=LABEL pairs, comma-separated "
                          "(REAL=real,FAKE=fake; a label is 0/1/real/fake)")
    return {name.strip(): value.strip() for name, _, value in pairs}


LABEL_FOLDERS_HELP = ("the corpus's own label folders, NAME=LABEL comma-separated (REAL=real,FAKE=fake), besides "
                      "the official 0_real / 1_fake / nature / ai")


def scan_config_from_args(args: argparse.Namespace):
    """The ScanConfig of --config and the flags given (those a command lacks: not given)."""
    from pipeline.scan.config import load_scan_config

    overrides = {field: getattr(args, flag[2:].replace("-", "_"), None) for flag, (field, _, _) in SCAN_FLAGS.items()}
    overrides["alignment"] = args.alignment
    extensions = getattr(args, "extensions", None)
    overrides["extensions"] = [e.strip().lstrip(".") for e in extensions.split(",") if e.strip()] \
        if extensions else None
    overrides.update({field: getattr(args, field, None) for field, _ in SCAN_SWITCHES.values()})
    overrides["sample"] = getattr(args, "sample", None)  # mirror scan's own
    overrides["label_folders"] = parse_label_folders(getattr(args, "label_folders", None))
    return load_scan_config(args.config, overrides)


def cmd_import_official(args: argparse.Namespace) -> int:
    from mirror_core.bundle import describe_model
    from mirror_core.official import import_official_bundle

    model_id, report = import_official_bundle(
        args.checkpoint, args.backbone, args.output, memory=args.memory, alignment=args.alignment,
        lora_alpha=args.lora_alpha, memory_heads=args.memory_heads, top_k=args.top_k,
    )
    for line in describe_model(report.config, report.weights) + report.notes:
        print(line)
    print(f"bundle: {args.output} (model_id {model_id})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from mirror_core.bundle import inspect_bundle

    info = inspect_bundle(args.bundle)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"bundle: {info['uri']} (model_id {info['model_id']}, {info['format']}, verified)")
    for line in info["summary"]:
        print(line)
    pre = info["preprocessing"]
    print(f"  resize short side {pre['resize_short_side']}, center crop {pre['crop_size']}, "
          f"JPEG q{pre['jpeg_quality']} alignment {pre['alignment']}, fast decode {'on' if pre['fast_decode'] else 'off'}")
    provenance = info["provenance"]
    sources = provenance.get("sources", {})
    origin = provenance.get("imported_from") or provenance.get("trained_from") or "unrecorded"
    print(f"provenance: {origin}" + "".join(f"; {role} {s.get('file') or s.get('dir')}" for role, s in sources.items()))
    for name, value in sorted(provenance.get("memory_config_from", {}).items()):
        print(f"  memory {name}: from {value}")
    libraries = provenance.get("libraries", {})
    if libraries:
        print("written with: " + ", ".join(f"{k} {v}" for k, v in sorted(libraries.items())))
    for name, digest in sorted(info["files"].items()):
        print(f"file: {name} sha256 {digest}")
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from pipeline.scan.run import plan_scan, run_scan, summary_line

    if args.plan_only:
        from pipeline.scan.status import status_lines

        for line in status_lines(plan_scan(args.model, args.input, args.output, scan_config_from_args(args))):
            print(line)
        return 0
    summary = run_scan(args.model, args.input, args.output, scan_config_from_args(args))
    print(summary_line(summary))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.commands.score import score_images, score_line

    failed = 0
    for row in score_images(args.model, args.images, scan_config_from_args(args), args.device):
        print(score_line(row, args.json), flush=True)
        failed += row["error"] is not None
    return int(failed > 0)


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.scan.export import export_scores

    result = export_scores(args.scan, args.output, only=args.only, rows_per_file=args.rows_per_file,
                           partial=args.partial)
    print(result.line())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from pipeline.commands.ingest import ingest_status, ingest_status_lines
    from pipeline.scan.export import export_status, export_status_lines
    from pipeline.scan.status import output_status, status_lines

    status, lines = ingest_status(args.output, count=args.count), ingest_status_lines
    if status is None:
        status, lines = export_status(args.output), export_status_lines
    if status is None:
        status, lines = output_status(args.output, count=args.count), status_lines
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else "\n".join(lines(status)))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.commands.ingest import ingest

    r = ingest(args.input, args.output, rows_per_shard=args.rows_per_shard,
               rows_per_row_group=args.rows_per_row_group, fetch_threads=args.fetch_threads,
               address=args.address, honour_opt_out=not args.ignore_opt_out,
               progress_every_s=args.progress_every_s, stall_report_s=args.stall_report_s, sample=args.sample,
               label_folders=parse_label_folders(args.label_folders))
    print(r.line())
    return 1 if r.failed_shards else 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from mirror_core.perturb import expand_sweep
    from pipeline.evaluation.evaluate import resolve_model, run_benchmarks
    from pipeline.evaluation.registry import load_registry

    if args.device == "cuda" and args.gpus_per_actor is None:
        args.gpus_per_actor = 1.0
    if args.use_amp and args.precision is None:
        args.precision = "fp16"
    if not args.data_root or not args.output:
        raise ValueError("--data-root (or --base_data_path) and --output (or --output_dir) are required")
    cfg = scan_config_from_args(args)
    model = resolve_model(args.output, args.model, args.model_path, args.memory_path, args.backbone_path)
    run = run_benchmarks(model, args.data_root, args.benchmarks, args.output, cfg, load_registry(args.registry),
                         expand_sweep(args.perturb or []), args.history, args.tolerance)
    for r in run.results:
        mean = r.rows[-1]
        print(f"{r.name}: {mean['Dataset']} Acc={mean['Acc']:.4f} Bal_Acc={mean['Bal_Acc']:.4f} AUC={mean['AUC']:.4f} "
              f"AP={mean['AP']:.4f} -> {r.csv_uri}")
    print(f"report: {run.report}")
    if run.comparison is not None:
        c = run.comparison
        print(f"history: {args.history}; " + (f"{len(c.regressions)} regression(s) vs run {c.previous_run}"
                                               if c.previous_run else "first run of this model"))
        for d in c.regressions:
            print(f"  REGRESSION {d['benchmark']}/{d['subset']} {d['metric']}: {d['previous']:.4f} -> "
                  f"{d['current']:.4f} ({d['delta']:+.4f})")
    return run.exit_code


def cmd_audit(args: argparse.Namespace) -> int:
    from pipeline.audit.audit import AuditConfig, run_audit

    cfg = AuditConfig(threshold=args.threshold, target_fpr=args.target_fpr, calibration=args.calibration,
                      group_by=args.group_by, prefix_depth=args.prefix_depth, filter_mode=args.filter,
                      top_n=args.top_n)
    args.threshold = None  # the audit decides the scan's threshold
    result = run_audit(args.model, args.input, args.output, scan_config_from_args(args), cfg)
    print(f"audited {result['rows']} rows: {result['flagged']} flagged "
          f"({100 * result['flagged_fraction']:.2f}% of {result['scored']} scored), {result['errors']} errors; "
          f"threshold {result['threshold']:.6g} ({result['threshold_method']})")
    print(f"flagged: {result['output']}/flagged.parquet  filtered: {result['output']}/filtered/  "
          f"report: {result['report']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mirror_core.config import MemoryConfig
    from pipeline.train.run import TrainConfig, metrics_line, run_training

    phase = 1 if args.command == "train-memory" else 2
    tc = TrainConfig(phase=phase, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_accum=args.grad_accum,
                     label_smoothing=args.label_smoothing, ortho_weight=args.ortho_weight,
                     val_fraction=args.val_fraction, label=args.label, num_workers=args.workers, use_gpu=args.gpu, seed=args.seed,
                     label_folders=parse_label_folders(args.label_folders),
                     name=args.name, ema_decay=args.ema,
                     **({} if args.max_failures is None else {"max_failures": args.max_failures}))
    memory = MemoryConfig(args.memory_slots, args.memory_heads, args.top_k) if phase == 1 else None
    card = run_training(args.base, args.input, args.output, args.storage, tc, args.address, memory)
    print(f"phase {phase}: {card['train_images']} training / {card['val_images']} held-out images, "
          f"{len(card['history'])} epochs" + (f" (resumed after epoch {card['resumed_from_epoch']})"
                                              if card["resumed_from_epoch"] is not None else ""))
    print("final: " + metrics_line(card["final"]))
    print(f"bundle: {args.output} (model_id {card['model_id']}), model card: {args.output}/model_card.json")
    return 0


def add_train_parser(sub, name: str, help_text: str, phase: int) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--base", required=True, help="bundle" + (" or DINOv3/DINOv2 directory" if phase == 1 else
                                                                " (the Phase 1 result)"))
    p.add_argument("--input", required=True, help=("real images" if phase == 1 else "labeled images (0_real/1_fake)")
                   + ": folder, manifest, Parquet or WebDataset shards; local or s3://")
    p.add_argument("--label", default="label", help="the label column of a manifest or Parquet input; WebDataset: "
                   "the member (e.g. cls) or .json field holding each sample's label (default: label)")
    p.add_argument("--label-folders", help=LABEL_FOLDERS_HELP)
    p.add_argument("--output", required=True, help="bundle to write")
    p.add_argument("--storage", required=True, help="Ray Train storage for checkpoints; rerun to resume")
    p.add_argument("--name", default=f"mirror-phase{phase}", help="run name under --storage")
    p.add_argument("--epochs", type=int, default=100 if phase == 1 else 10, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=128 if phase == 1 else 32, help="per worker")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0 if phase == 1 else 100, help="linear warm-up, in optimizer steps")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="phase 2: cross-entropy label smoothing")
    p.add_argument("--ortho-weight", type=float, default=0.01, help="phase 1: orthogonality penalty weight")
    p.add_argument("--memory-slots", type=int, default=4096, help="phase 1 from a backbone directory")
    p.add_argument("--memory-heads", type=int, default=8, help="phase 1: memory-bank attention heads")
    p.add_argument("--top-k", type=int, default=128, help="phase 1: memory slots kept per query")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of the input (by record: the hash of its "
                   "path below the input picks it, the same in every run)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, augmentation and shuffling")
    p.add_argument("--max-failures", type=int, help="worker failures (a lost node) the run recovers from, each "
                   "from its last checkpoint; -1: no limit (default: 3)")
    p.add_argument("--ema", type=float, help="EMA decay (e.g. 0.999): validate and export averaged weights")
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=cmd_train)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.commands.demo import run_demo
    from pipeline.scan.run import summary_line

    summary = run_demo(args.workdir)
    for subset, m in summary.get("metrics", {}).items():
        print(f"  {subset:>10}: n={m['n']} Acc={m['Acc']:.3f} Bal_Acc={m['Bal_Acc']:.3f} AUC={m['AUC']:.3f}")
    print(summary_line(summary))
    print("(smoke-test weights: these numbers only show the pipeline works)")
    bundle = f"{args.workdir}/bundle"
    print(f"next: `mirror score --model {bundle} IMAGE...` scores images here; `mirror status --output "
          f"{args.workdir}/scan` and `mirror export --scan {args.workdir}/scan --output DEST` read the scan; "
          "real weights: `mirror import-official` (README, Real weights)")
    return 0


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mirror-at-scale")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from pipeline.scan.export import ROW_CHOICES

    parser = argparse.ArgumentParser(prog="mirror", description="MIRROR AI-generated image detection at scale",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add_parser(*a, formatter_class=HelpFormatter, **kw)

    p = sub.add_parser("inspect", help="what a bundle is: architecture, preprocessing, threshold, provenance, hashes")
    p.add_argument("bundle", help="bundle directory or URI")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import-official", help="convert official .pth weights into a model bundle (safely)")
    p.add_argument("--checkpoint", required=True, help="official Phase 2 checkpoint-*.pth")
    p.add_argument("--memory", help="official Phase 1 mirror_phase1*.pth (optional when the checkpoint has memory_bank.*)")
    p.add_argument("--backbone", required=True, help="DINOv3 / DINOv2 directory (config.json)")
    p.add_argument("--output", "--out", dest="output", required=True, help="bundle directory or URI (s3://...)")
    p.add_argument("--alignment", choices=ALIGNMENT_MODES, default="by-extension",
                   help="JPEG q96 format alignment recorded in the bundle (default: official by-extension)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: checkpoint args, else 2 x rank = official 16)")
    p.add_argument("--memory-heads", type=int, help="memory-bank heads (default: memory_config, else 8)")
    p.add_argument("--top-k", type=int, help="memory-bank top_k (default: memory_config, else 128)")
    p.set_defaults(func=cmd_import_official)

    p = sub.add_parser("scan", help="score every image of a folder / Parquet shards / manifest with Ray")
    p.add_argument("--model", required=True, help="bundle directory or URI")
    p.add_argument("--input", required=True, help="folder, Parquet shard(s), WebDataset tar shard(s), zip archive(s), manifest "
                   "(.csv/.tsv/.txt/.jsonl, also compressed, or .parquet) or one image; local or s3://")
    p.add_argument("--output", required=True, help="output directory or URI; rerun the same command to resume")
    p.add_argument("--plan-only", action="store_true", help="plan the input into --output (with --update: re-list "
                   "it) and say what a scan will score, scoring nothing and starting no Ray; the same command "
                   "without it then scores")
    p.add_argument("--sample", type=float, help="score only this fraction of the records (0.01: about 1 in 100), "
                   "the same ones every run (chosen by a hash of each uri): a first look at a large corpus, the "
                   "summary giving the flagged share with its 95%% interval; an --output holds one sample")
    add_scan_flags(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("score", help="score a few images here, a line each (no Ray, no output folder); exit 1 "
                       "when one could not be scored")
    p.add_argument("--model", required=True, help="bundle directory or URI")
    p.add_argument("images", nargs="+", help="image files or URIs (s3://, https://)")
    p.add_argument("--json", action="store_true", help="a JSON object per image, with every signal")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU when there is one)")
    add_scan_flags(p, only=("--batch-size", "--threshold", "--precision", "--fetch-threads", "--fast-decode"))
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("status", help="how far a scan's output (or an ingest's) has got: committed and left, errors "
                       "counted; no Ray, while it runs too")
    p.add_argument("--output", required=True, help="a scan's output directory or URI, an audit's or a benchmark "
                   "run's (each scan it holds), an ingest's or an export's")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--count", action="store_true", help="also count the errors of parts committed since the last "
                   "summary (reads each of them once; writes nothing); of an ingest, the rows kept with a read_error")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="a scan's rows as a few large Parquet files in the input's order (all, "
                       "scored, errors or flagged)")
    p.add_argument("--scan", required=True, help="a scan's --output (local or s3://): its committed parts are read")
    p.add_argument("--output", required=True, help="folder or URI for scores-00000.parquet, ... and _export.json")
    p.add_argument("--only", choices=ROW_CHOICES, default="all",
                   help="which rows: every row, those scored, those with an error, or those flagged fake (pred 1)")
    p.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per Parquet file at most")
    p.add_argument("--partial", action="store_true", help="export an unfinished scan's committed rows (else refused)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ingest", help="pack a folder tree of images, or a manifest's images, into Parquet shards")
    p.add_argument("--input", required=True, help="image folder, or a manifest file (web links, paths: as a scan "
                   "reads one); local or s3://")
    p.add_argument("--output", required=True, help="shard directory (local or s3://)")
    p.add_argument("--rows-per-shard", type=int, default=4096, help="images per Parquet shard")
    p.add_argument("--rows-per-row-group", type=int, default=256, help="row group = unit of scan work")
    p.add_argument("--fetch-threads", type=int, default=16, help="concurrent file reads per shard task")
    p.add_argument("--sample", type=float, help="pack only this fraction of the records (0.01: about 1 in 100), "
                   "drawn as `mirror scan --sample` draws them (by a hash of each uri)")
    p.add_argument("--label-folders", help=LABEL_FOLDERS_HELP)
    p.add_argument("--ignore-opt-out", action="store_true",
                   help="also download web images whose site opts out of AI use (X-Robots-Tag noai / noimageai)")
    p.add_argument("--progress-every-s", type=float, default=60.0,
                   help="a line of images done, rate and time left this often (0: none)")
    p.add_argument("--stall-report-s", type=float, default=600.0,
                   help="no shard written this long: a warning with the cluster's free resources (0: none)")
    p.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else local Ray)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("benchmark", help="official metrics CSVs for registered benchmarks (+ nightly history)")
    p.add_argument("--model", help="bundle directory or URI")
    p.add_argument("--data-root", "--base_data_path", dest="data_root", help="folder (or URI) holding the benchmarks")
    p.add_argument("--benchmarks", nargs="+", required=True, help="registry names (any other name: a folder)")
    p.add_argument("--output", "--output_dir", dest="output", help="where CSVs, JSON, scans and the report go")
    p.add_argument("--registry", help="YAML of extra benchmarks (see configs/benchmarks.yaml)")
    p.add_argument("--history", help="nightly mode: Parquet history folder/URI to append to and compare with")
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed drop per metric before it is a regression")
    p.add_argument("--perturb", nargs="+", help="robustness sweep, e.g. jpeg:95,75,50 blur:1,2 resize:0.5")
    # the official script's flags, so its users only change the command name
    p.add_argument("--model_path", help="official checkpoint-*.pth (imported on the fly)")
    p.add_argument("--memory_path", help="official mirror_phase1.pth")
    p.add_argument("--backbone_path", help="DINOv3 directory")
    p.add_argument("--batch_size", dest="batch_size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("cpu", "cuda"), help="cuda: one GPU per scoring actor")
    p.add_argument("--use_amp", action="store_true", help="fp16 autocast on GPU (official --use_amp)")
    add_scan_flags(p)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("audit", help="audit a corpus: flagged manifest, group summary, filtered copy, heatmaps")
    p.add_argument("--model", required=True, help="bundle directory or URI")
    p.add_argument("--input", required=True, help="corpus: Parquet shards, folder or manifest; local or s3://")
    p.add_argument("--output", required=True, help="output directory or URI")
    p.add_argument("--target-fpr", type=float, help="pick the threshold for this FPR on --calibration")
    p.add_argument("--calibration", help="labeled or all-real image set for --target-fpr")
    p.add_argument("--group-by", help="input column to summarise by (source, domain, shard, ...)")
    p.add_argument("--prefix-depth", type=int, help="or summarise by the first N folders of each uri")
    p.add_argument("--filter", choices=("drop", "mark"), default="drop",
                   help="filtered copy: drop flagged rows, or keep all with a mirror_keep column")
    p.add_argument("--top-n", type=int, default=16, help="flagged images to explain with heatmaps")
    add_scan_flags(p)
    p.set_defaults(func=cmd_audit)

    add_train_parser(sub, "train-memory", "Phase 1: train the memory bank on real images (Ray Train)", 1)
    add_train_parser(sub, "train-detector", "Phase 2: train LoRA + head on labeled images (Ray Train)", 2)

    p = sub.add_parser("demo", help="offline end-to-end run on smoke-test weights and generated images")
    p.add_argument("--workdir", default="mirror-demo", help="where to write weights, images and results")
    p.set_defaults(func=cmd_demo)
    return parser


# botocore's errors for credentials or a region it cannot find: the machine's set-up, not a bug
CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "NoRegionError")


def setup_error(err: Exception) -> str | None:
    """One line for an error of the machine's set-up that is no ValueError (S3 credentials
    missing, its endpoint unreachable), else None."""
    if not type(err).__module__.startswith("botocore"):
        return None
    if type(err).__name__ in CREDENTIAL_ERRORS:
        return (f"{error_text(err)} (s3:// needs AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or an instance role; on a cluster, on every node: env_vars of the runtime environment)")
    if type(err).__name__ in ("EndpointConnectionError", "ConnectTimeoutError"):
        return f"{error_text(err)} (the S3 endpoint cannot be reached: check the network, AWS_ENDPOINT_URL and the region)"
    return None


# Commands whose work, interrupted, is taken up where it stopped by the same command.
RESUMABLE = ("scan", "benchmark", "audit", "ingest", "train-memory", "train-detector")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # Errors about the user's input, files or settings: one line. Anything else is a bug
    # and keeps its traceback.
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as err:
        print(f"mirror {args.command}: error: {error_text(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if (line := setup_error(err)) is None:
            raise
        print(f"mirror {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the user's, not a bug: no traceback
        resumes = args.command in RESUMABLE
        print(f"mirror {args.command}: interrupted" + ("; what was committed is kept: the same command resumes"
                                                       if resumes else ""), file=sys.stderr)
        return 130


def entry(argv: list[str] | None = None) -> None:
    """The `mirror` executable (and `jobs/*.py`): `main` with a clean console."""
    from pipeline.commands.console import filter_ray_false_alarm
    from pipeline.progress import log_to_console

    filter_ray_false_alarm()
    log_to_console()
    try:
        code = main(argv)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`mirror score ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would raise again
        code = 141
    sys.exit(code)


if __name__ == "__main__":
    entry()
