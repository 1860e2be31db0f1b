"""Detector: single-process scoring of images, paths or bytes, in batches."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .bundle import Bundle, load_bundle
from .config import PRECISION_NAMES, MirrorConfig
from .errors import error_text
from .fp8 import fp8_linears_, fp8_supported
from .fused import fuse_projections_, patch_embedding_as_linear_, precompute_rope_
from .gelu_gemm import gelu_epilogue_
from .model import MirrorModel, assemble_model
from .preprocess import Preprocessed, official_preprocess, preprocess_rgb, read_bytes
from .readout import inference_readout
from .signals import SIGNALS  # the output row's score columns are these plus the decision `pred`


class Precision(NamedTuple):
    autocast: torch.dtype | None  # autocast dtype (None: off)
    weights: torch.dtype | None  # the model cast to this dtype (None: as loaded)
    fp8_gemms: bool = False  # the backbone's Linear layers in FP8 (mirror_core/fp8.py)
    gelu_tanh: bool = False  # GELU MLPs' up projection + tanh GELU as one GEMM (mirror_core/gelu_gemm.py)


# "bf16-weights" casts the whole model: faster than autocast (no fp32 LayerNorms / residual
# stream) and a little further from fp32 scores; "bf16-gelu-tanh" is bf16-weights with the
# backbone's exact GELU replaced by its tanh approximation, computed in the up projection's
# GEMM epilogue (cuBLASLt on CUDA); "fp8" is bf16-weights with FP8 backbone GEMMs, further
# still (opt-in, GPUs with FP8 tensor cores). The memory-bank softmaxes, max and entropy
# stay fp32 in every mode.
PRECISIONS = {"fp32": Precision(None, None), "bf16": Precision(torch.bfloat16, None),
              "fp16": Precision(torch.float16, None), "bf16-weights": Precision(None, torch.bfloat16),
              "bf16-gelu-tanh": Precision(None, torch.bfloat16, gelu_tanh=True),
              "fp8": Precision(None, torch.bfloat16, fp8_gemms=True)}
assert tuple(PRECISIONS) == PRECISION_NAMES


class Detector:
    """A MIRROR model ready to score, plus its preprocessing policy.

    `score_pixels` takes preprocessed uint8 crops (what the pipeline ships between
    stages); `score` takes anything a user has: PIL images, paths/URIs or bytes.
    """

    def __init__(self, model: MirrorModel, config: MirrorConfig, model_id: str, device="cpu", precision="fp32",
                 compile: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        mode = PRECISIONS[precision]
        if mode.fp8_gemms and not fp8_supported(self.device):
            raise ValueError(f"precision fp8 needs FP8 tensor cores (compute capability 8.9+); {self.device} has none")
        self.model = model.to(self.device, dtype=mode.weights).eval()  # dtype None: as loaded
        if self.device.type == "cuda":  # GEMMs where the GPU runs them best; CPU keeps the exact official layout
            fuse_projections_(self.model.backbone)
            patch_embedding_as_linear_(self.model.backbone)
        if mode.fp8_gemms:
            fp8_linears_(self.model.backbone)
        if mode.gelu_tanh and not gelu_epilogue_(self.model.backbone, approximate="tanh"):
            raise ValueError(f"precision {precision} approximates the exact GELU of DINOv3 ViT-S/B/L MLPs; this "
                             "backbone has none (gated SwiGLU MLPs, as ViT-H+, or another family): use bf16-weights")
        precompute_rope_(self.model.backbone, config.preprocess.crop_size)  # the same values, computed once
        self.config = config
        self.model_id = model_id
        self.precision = precision
        # torch.compile specialises on the batch size: batches are padded up to a power
        # of two, so a scan compiles a handful of graphs instead of one per tail size.
        self.compiled = torch.compile(self.model, dynamic=False) if compile else None

    @classmethod
    def from_bundle(cls, bundle: Bundle, device="cpu", precision="fp32", alignment: str | None = None,
                    compile: bool = False) -> "Detector":
        config = bundle.config.with_overrides(alignment=alignment)
        return cls(assemble_model(config, bundle.weights), config, bundle.model_id, device, precision, compile)

    @classmethod
    def from_pretrained(cls, uri: str | Path, device="cpu", precision="fp32", alignment: str | None = None,
                        compile: bool = False) -> "Detector":
        """Load a bundle directory (local path or fsspec URI such as s3://...)."""
        return cls.from_bundle(load_bundle(str(uri)), device, precision, alignment, compile)

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def readout(self) -> str:
        """The memory bank's read-out this replica runs (C++ extension, its fallback, Triton...)."""
        mode = PRECISIONS[self.precision]
        return inference_readout(self.device, mode.autocast is not None or mode.weights is not None)

    def _autocast(self):
        dtype = PRECISIONS[self.precision].autocast
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)  # on CPU too: asked for, so done

    def score_pixels(self, pixels: np.ndarray, token_residuals: bool = False) -> dict[str, np.ndarray]:
        """uint8 [B, 224, 224, 3] -> named float arrays [B] (and 'token_residual' [B, gh, gw])."""
        pixels = np.require(pixels, np.uint8, ["C_CONTIGUOUS"])
        with warnings.catch_warnings():  # read-only arrays (Ray's zero-copy batches) are never written
            warnings.simplefilter("ignore", UserWarning)
            batch = torch.from_numpy(pixels)
        return self.score_tensor(batch, token_residuals)

    @torch.inference_mode()
    def score_tensor(self, batch: torch.Tensor, token_residuals: bool = False) -> dict[str, np.ndarray]:
        """score_pixels for a uint8 [B, 224, 224, 3] tensor on any device (GPU-decoded crops stay there)."""
        n = batch.shape[0]
        model = self.model
        if self.compiled is not None and n:
            padded = 1 << (n - 1).bit_length()  # rows are independent: padding changes no score
            batch = torch.cat([batch, batch.new_zeros((padded - n, *batch.shape[1:]))]) if padded > n else batch
            model = self.compiled
        if self.device.type == "cuda" and batch.device.type != "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with self._autocast():
            out = model(batch, token_residuals=token_residuals)
        result = {
            "logit_real": out.logits[:, 0],
            "logit_fake": out.logits[:, 1],
            "prob_fake": out.prob_fake,
            "max_score": out.max_score,
            "entropy": out.entropy,
            "residual_norm": out.residual_norm,
        }
        if token_residuals:
            result["token_residual"] = out.token_residual
        return {k: v[:n].float().cpu().numpy() for k, v in result.items()}

    def preprocess(self, item: Any, name: str | None = None) -> Preprocessed:
        """PIL image, path/URI or bytes -> the policy's uint8 crop."""
        cfg = self.config.preprocess
        if isinstance(item, Image.Image):
            return preprocess_rgb(item, cfg, name=name, fmt=item.format)
        if isinstance(item, (str, Path)):
            return official_preprocess(read_bytes(item), cfg, name=name or str(item))
        if isinstance(item, (bytes, bytearray, memoryview)):
            return official_preprocess(bytes(item), cfg, name=name)
        raise TypeError(f"cannot score an object of type {type(item).__name__}")

    def score(
        self, items: Iterable[Any], batch_size: int = 32, names: Sequence[str | None] | None = None
    ) -> list[dict[str, Any]]:
        """One dict per item, in order: the signals + 'pred', or an 'error' message."""
        items = list(items)
        names = list(names) if names is not None else [None] * len(items)
        rows: list[dict[str, Any]] = [{} for _ in items]
        ready: list[tuple[int, Preprocessed]] = []
        for i, (item, name) in enumerate(zip(items, names)):
            try:
                ready.append((i, self.preprocess(item, name)))
            except Exception as err:  # one bad image never sinks the batch
                rows[i] = {"error": error_text(err)}
        for start in range(0, len(ready), batch_size):
            chunk = ready[start : start + batch_size]
            scores = self.score_pixels(np.stack([p.pixels for _, p in chunk]))
            for j, (i, pre) in enumerate(chunk):
                row = {k: float(scores[k][j]) for k in SIGNALS}
                row.update(pred=int(row["prob_fake"] > self.threshold), width=pre.width, height=pre.height,
                           format=pre.format, aligned=pre.aligned, error=None)
                rows[i] = row
        return rows
