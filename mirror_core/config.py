"""Configuration dataclasses for a MIRROR model.

Everything that shapes the network lives here so that a bundle's JSON fully
describes the architecture; nothing is inferred from file or folder names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# Backbone families we know how to load; the token layout follows the HF config.
BACKBONE_FAMILIES = {"dinov3_vit": "dinov3", "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}

ALIGNMENT_MODES = ("by-extension", "by-format", "off")

# How a replica computes (what each means: `detector.PRECISIONS`); named here so that
# checking a setting does not import torch.
PRECISION_NAMES = ("fp32", "bf16", "fp16", "bf16-weights", "bf16-gelu-tanh", "fp8")

ENTROPY_EPS = 1e-9  # the official read-out entropy is -sum A log(A + 1e-9)


@dataclass
class BackboneConfig:
    """A Hugging Face vision transformer, described by its own config dict."""

    hf_config: dict[str, Any]

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    @property
    def family(self) -> str:
        if self.model_type not in BACKBONE_FAMILIES:
            raise ValueError(
                f"unsupported backbone model_type {self.model_type!r}; "
                f"expected one of {sorted(BACKBONE_FAMILIES)}"
            )
        return BACKBONE_FAMILIES[self.model_type]

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_register_tokens(self) -> int:
        return int(self.hf_config.get("num_register_tokens", 0) or 0)

    @property
    def patch_size(self) -> int:
        return int(self.hf_config["patch_size"])


@dataclass
class LoraSettings:
    """LoRA on the attention projections. `targets=None` means q/k/v of the backbone."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class MemoryConfig:
    num_slots: int = 4096
    num_heads: int = 8
    top_k: int = 128


@dataclass
class HeadConfig:
    """Sizes of the dual-branch head (official: 64 / 512 / 256 / 512)."""

    perplexity_dim: int = 64
    residual_hidden: int = 512
    residual_dim: int = 256
    hidden: int = 512
    dropout: float = 0.3
    num_classes: int = 2


@dataclass
class PreprocessConfig:
    """The named evaluation policy and its JPEG-alignment choice."""

    policy: str = "official"
    alignment: str = "by-extension"
    resize_short_side: int = 512
    crop_size: int = 224
    jpeg_quality: int = 96
    # Decoding is refused above this many pixels (header check, before any pixel is
    # decoded): decompression bombs and lying headers cost bounded memory.
    max_pixels: int = 100_000_000
    # Fast mode (never the default): JPEGs at least twice the target size are decoded
    # at a reduced DCT scale before the bicubic resize. Faster, not bit-exact.
    fast_decode: bool = False
    # GPU mode (opt-in, needs a CUDA replica): JPEGs are decoded, resized and cropped on
    # the GPU; other formats, and JPEGs the GPU decoder refuses, take the exact CPU path
    # (every row records which). Not bit-exact: a different IDCT and resampler.
    gpu_decode: bool = False

    def __post_init__(self) -> None:
        if self.fast_decode and self.gpu_decode:
            raise ValueError("fast_decode and gpu_decode exclude each other: choose one decode mode")
        if self.policy != "official":
            raise ValueError(f"unknown preprocessing policy {self.policy!r}; known: 'official'")
        if self.alignment not in ALIGNMENT_MODES:
            raise ValueError(f"unknown alignment {self.alignment!r}; expected one of {ALIGNMENT_MODES}")

    @property
    def name(self) -> str:
        """Short recorded form, e.g. 'official/align=by-extension'."""
        mode = "/fast-decode" if self.fast_decode else "/gpu-decode" if self.gpu_decode else ""
        return f"{self.policy}/align={self.alignment}{mode}"

    @property
    def cpu_name(self) -> str:
        """What a row decoded on the CPU under this policy records (GPU mode's fallback)."""
        return replace(self, gpu_decode=False).name


@dataclass
class MirrorConfig:
    backbone: BackboneConfig
    lora: LoraSettings = field(default_factory=LoraSettings)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    threshold: float = 0.5

    @property
    def dim(self) -> int:
        return self.backbone.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, alignment: str | None = None, fast_decode: bool = False,
                       threshold: float | None = None, gpu_decode: bool = False) -> "MirrorConfig":
        """This config with the choices a scan may override (None / False: keep the bundle's)."""
        preprocess = self.preprocess
        if alignment:
            preprocess = replace(preprocess, alignment=alignment)
        if fast_decode or gpu_decode:
            preprocess = replace(preprocess, fast_decode=fast_decode, gpu_decode=gpu_decode)
        return replace(self, preprocess=preprocess, threshold=self.threshold if threshold is None else threshold)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MirrorConfig":
        def build(kind, values):
            known = {f.name for f in fields(kind)}
            extra = set(values) - known
            if extra:
                raise ValueError(f"unknown keys for {kind.__name__}: {sorted(extra)}")
            return kind(**values)

        return cls(
            backbone=build(BackboneConfig, d["backbone"]),
            lora=build(LoraSettings, d.get("lora", {})),
            memory=build(MemoryConfig, d.get("memory", {})),
            head=build(HeadConfig, d.get("head", {})),
            preprocess=build(PreprocessConfig, d.get("preprocess", {})),
            threshold=float(d.get("threshold", 0.5)),
        )
