"""Scan settings: one dataclass, filled from YAML and CLI flags, validated strictly."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirror_core.config import ALIGNMENT_MODES, PRECISION_NAMES
from pipeline.scan.labels import label_folders
from pipeline.scan.units import DEFAULT_EXTENSIONS, INPUT_FORMATS, ColumnMap, SourceOptions


class ConfigError(ValueError):
    pass


@dataclass
class ScanConfig:
    batch_size: int = 32  # images per model call
    actors: int = 1  # scoring actors (replicas); max_actors > actors enables autoscaling
    max_actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # None: 1 on GPU; on CPU see pipeline.scan.scoring_cpus
    cpus_per_decode_task: float = 1.0
    fetch_threads: int = 16  # concurrent reads per decode task (S3 latency hiding)
    max_file_mb: int = 256  # larger files become error rows without being read whole
    decode_rows_per_batch: int = 64
    decode_timeout_s: int = 300  # a record's decode taking longer ends as an error row (hung)
    progress_every_s: float = 60.0  # a line of rows done, rate and time left this often (0: none)
    stall_report_s: float = 600.0  # no unit committed this long: a warning with the free resources (0: none)
    decode_task_memory_mb: int = 1024  # reserved per decode task (a unit of full-size JPEGs peaks near 1 GB)
    commit_writers: int | None = None  # writer actors of the commit stage; default one per node with CPUs
    unit_size: int = 256  # records per committed unit (folders, manifests)
    precision: str | None = None  # fp32 | bf16 | fp16 | bf16-weights | bf16-gelu-tanh | fp8; default bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile each replica (slower start; see BENCHMARKS.md)
    alignment: str | None = None  # override the bundle's JPEG alignment policy
    fast_decode: bool = False  # reduced-scale JPEG decoding (not bit-exact; recorded; faster without the region decoder)
    gpu_decode: bool = False  # JPEGs decoded, resized and cropped on the replicas' GPUs (not bit-exact; recorded)
    replica_overlap: bool = True  # GPU replicas: one block uploads (or GPU-decodes) while another scores
    threshold: float | None = None  # override the bundle's decision threshold
    input_format: str = "auto"
    perturbation: str | None = None  # robustness sweeps: e.g. 'jpeg:75', applied before preprocessing
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    columns: dict[str, str] = field(default_factory=lambda: dataclasses.asdict(ColumnMap()))
    address: str | None = None  # Ray cluster; default RAY_ADDRESS or a local Ray
    update: bool = False  # re-list the input: new files / shards become new units, scored now
    retry_errors: bool = False  # score again the finished units holding read failures
    sample: float | None = None  # `mirror scan` only: score this fraction of the records (pipeline.scan.sample)
    label_folders: dict[str, Any] | None = None  # a corpus's own label folder names ({REAL: real, FAKE: fake})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "settings") -> None:
        positive = ("batch_size", "actors", "fetch_threads", "max_file_mb", "decode_rows_per_batch", "decode_task_memory_mb",
                    "unit_size", "decode_timeout_s")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name} must be >= 1, got {getattr(self, name)}")
        if self.commit_writers is not None and self.commit_writers < 1:
            raise ConfigError(f"{source}: commit_writers must be >= 1, got {self.commit_writers}")
        for name in ("gpus_per_actor", "cpus_per_actor", "cpus_per_decode_task"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{source}: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_actors is not None and self.max_actors < self.actors:
            raise ConfigError(f"{source}: max_actors ({self.max_actors}) must be >= actors ({self.actors})")
        if self.precision is not None and self.precision not in PRECISION_NAMES:
            raise ConfigError(f"{source}: precision must be one of {sorted(PRECISION_NAMES)}, got {self.precision!r}")
        if self.alignment is not None and self.alignment not in ALIGNMENT_MODES:
            raise ConfigError(f"{source}: alignment must be one of {list(ALIGNMENT_MODES)}, got {self.alignment!r}")
        if self.gpu_decode and self.fast_decode:
            raise ConfigError(f"{source}: fast_decode and gpu_decode exclude each other: choose one decode mode")
        if self.gpu_decode and not self.gpus_per_actor:
            raise ConfigError(f"{source}: gpu_decode needs GPU replicas (gpus_per_actor > 0)")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{source}: threshold must be within [0, 1], got {self.threshold}")
        if self.sample is not None and not 0.0 < self.sample <= 1.0:
            raise ConfigError(f"{source}: sample must be a fraction within (0, 1], got {self.sample} "
                              "(0.01 scores about 1 record in 100)")
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(f"{source}: input_format must be one of {list(INPUT_FORMATS)}, got {self.input_format!r}")
        if self.perturbation is not None:
            from mirror_core.perturb import parse_perturbation

            try:
                parse_perturbation(self.perturbation)
            except ValueError as err:
                raise ConfigError(f"{source}: {err}") from None
        if self.label_folders is not None:
            try:
                label_folders(self.label_folders)
            except ValueError as err:
                raise ConfigError(f"{source}: label_folders: {err}") from None
        unknown = set(self.columns) - {f.name for f in dataclasses.fields(ColumnMap)}
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) under columns: {sorted(unknown)}")

    def scoring_precision(self, gpu: bool) -> str:
        """The precision replicas score in: the one set, else bf16 autocast on GPUs, fp32 on CPUs."""
        return self.precision or ("bf16" if gpu else "fp32")

    def source_options(self) -> SourceOptions:
        return SourceOptions(self.input_format, tuple(self.extensions), ColumnMap(**self.columns), self.unit_size,
                             index_on_cluster=True, address=self.address, sample=self.sample,
                             label_folders=label_folders(self.label_folders))

    def whole_input(self, command: str) -> None:
        """Refuses a sample to a command that needs every image (an audit's filtered copy,
        a benchmark's metrics)."""
        if self.sample is not None:
            raise ConfigError(f"sample ({self.sample}) is for mirror scan: {command} reads every image; "
                              "remove it from the settings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, value: Any, source: str) -> Any:
    hint = typing.get_type_hints(ScanConfig)[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        base = typing.get_origin(kind) or kind
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base in (str, list, dict) and isinstance(value, base):
            return value
    expected = hint.__name__ if isinstance(hint, type) else str(hint)
    raise ConfigError(f"{source}: {name} must be {expected}, got {type(value).__name__} {value!r}")


def scan_config_from(values: dict[str, Any], source: str = "settings") -> ScanConfig:
    known = {f.name for f in dataclasses.fields(ScanConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    checked = {k: _check_type(k, v, source) for k, v in values.items()}
    cfg = ScanConfig.__new__(ScanConfig)
    defaults = ScanConfig()
    for f in dataclasses.fields(ScanConfig):
        setattr(cfg, f.name, checked.get(f.name, getattr(defaults, f.name)))
    if "columns" in checked:
        cfg.columns = {**defaults.columns, **checked["columns"]}
    cfg.validate(source)
    return cfg


def load_scan_config(path: str | Path | None, overrides: dict[str, Any]) -> ScanConfig:
    """YAML file (optional) then CLI overrides (None values mean 'not given')."""
    import yaml

    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        text = Path(path).read_text()
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML at {where}: {problem}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
        source = str(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return scan_config_from(values, source)
