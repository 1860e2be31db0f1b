"""The benchmark registry: name -> folder under the data root -> sub-datasets.

Built in: the benchmarks the official evaluation knows. A YAML file adds or
overrides entries:

    MyBench: {folder: my_bench, subsets: [genA, genB]}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    folder: str
    subsets: tuple[str, ...] = field(default_factory=tuple)  # empty: one set, CSV row 'ALL'


_AIGI_HUMAN = ("SD-3-Medium", "SD-3.5-Large", "FLUX.1-dev", "PixArt-Sigma", "Midjourney-v6", "DALL-E-3")
_REALCHAIN = ("flux", "hunyuan3.0", "nanobanana", "qwenimage", "sd3.5", "seedream_i2i", "seedream4")
_BUILTIN = [
    ("AIGCDetectBenchmark", "AIGC_bm", "sd_xl progan stylegan biggan cyclegan stargan gaugan stylegan2 whichfaceisreal "
     "ADM Glide Midjourney stable_diffusion_v_1_4 stable_diffusion_v_1_5 VQDM wukong DALLE2"),
    ("Genimage", "Genimage", "Midjourney stable_diffusion_v_1_4 stable_diffusion_v_1_5 ADM Glide wukong VQDM biggan2"),
    ("UnivFD", "UniversalFakeDetect", "deepfake seeingdark san ldm_200_cfg ldm_200 ldm_100 imle guided glide_50_27 "
     "glide_100_27 glide_100_10 dalle crn"),
    ("ojha", "ojha", "deepfake san crn imle guided ldm_100 ldm_200 ldm_200_cfg glide_50_27 glide_100_10 glide_100_27 dalle"),
    ("Synthbuster", "synthbuster", "dalle2 dalle3 firefly glide midjourney-v5 stable-diffusion-1-3 stable-diffusion-1-4 "
     "stable-diffusion-2 stable-diffusion-xl"),
    ("EvalGEN", "GenEval-JPEG", "OmniGen NOVA Infinity GoT Flux"),
    ("DRCT", "drct", "real SDXL-DR LDM SDv1.4 SDv1.5 SDv2 SDXL SDXL-Refiner SD-Turbo SDXL-Turbo LCM-SDv1.5 LCM-SDXL "
     "SDv1-Ctrl SDv2-Ctrl SDXL-Ctrl SDv1-DR SDv2-DR"),
    ("Synthwildx", "synthwildx", "dalle3 firefly midjourney_v5"),
    ("WildRF", "WildRF/test", "facebook reddit twitter"),
    ("AIGIBench", "AIGIBench", "SocialRF CommunityAI"),
    ("CO-SPY", "CO-SPY-In-the-Wild", "midjourney lexica flux dalle3 civitai"),
    ("AIGI-Human-hard", "aigi_human", " ".join(_AIGI_HUMAN)),
    ("AIGI-Human-orig", "human_aigi_orig", " ".join(_AIGI_HUMAN)),
    ("realchain_all", "realchain_all", " ".join(_REALCHAIN)),
    ("realchain_CD_all", "realchain_CD_all", " ".join(_REALCHAIN)),
    ("Chameleon", "Chameleon/test", ""),
    ("RRDataset", "RRDataset", ""),
    ("B-Free", "B-Free", ""),
    ("AIGI-Now", "AIGI-Now", ""),
]
BUILTIN = {name: BenchmarkSpec(name, folder, tuple(subsets.split())) for name, folder, subsets in _BUILTIN}


def load_registry(path: str | Path | None = None) -> dict[str, BenchmarkSpec]:
    """Built-ins plus (overridden by) a YAML file of user benchmarks."""
    import yaml

    registry = dict(BUILTIN)
    if path is None:
        return registry
    doc = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of benchmark name -> {{folder, subsets}}")
    for name, entry in doc.items():
        if not isinstance(entry, dict) or "folder" not in entry:
            raise ValueError(f"{path}: benchmark {name!r} needs a 'folder'")
        unknown = set(entry) - {"folder", "subsets"}
        if unknown:
            raise ValueError(f"{path}: benchmark {name!r} has unknown key(s) {sorted(unknown)}")
        subsets = entry.get("subsets") or []
        if not isinstance(subsets, list) or not all(isinstance(s, str) for s in subsets):
            raise ValueError(f"{path}: benchmark {name!r}: subsets must be a list of folder names")
        registry[name] = BenchmarkSpec(name, str(entry["folder"]), tuple(subsets))
    return registry


def resolve(name: str, registry: dict[str, BenchmarkSpec]) -> BenchmarkSpec:
    """Any other name is a folder of that name with no sub-datasets (as official)."""
    return registry.get(name) or BenchmarkSpec(name, name, ())
