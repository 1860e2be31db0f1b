"""torch.compile'd replicas: same scores, batches padded to powers of two."""
import numpy as np
import pytest

from mirror_core.config import BackboneConfig, MirrorConfig
from mirror_core.detector import Detector
from mirror_core.model import assemble_model
from mirror_core.smoke import DEMO_BACKBONE, DEMO_MEMORY, random_mirror


@pytest.mark.slow
def test_compiled_detector_scores_like_eager_for_ragged_batches():
    cfg = MirrorConfig(backbone=BackboneConfig(dict(DEMO_BACKBONE)), memory=DEMO_MEMORY)
    _, weights = random_mirror(cfg, seed=5)
    eager = Detector(assemble_model(cfg, weights), cfg, "m")
    compiled = Detector(assemble_model(cfg, weights), cfg, "m", compile=True)
    pixels = np.random.default_rng(0).integers(0, 256, (7, 224, 224, 3), dtype=np.uint8)
    pixels.setflags(write=False)  # as Ray hands batches over: read-only, never copied for that
    sizes = []
    compiled.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    for n in (7, 4, 3):  # 7 and 3 are padded (to 8 and 4); 4 is not
        want, got = eager.score_pixels(pixels[:n]), compiled.score_pixels(pixels[:n])
        assert set(got) == set(want) and all(len(v) == n for v in got.values())
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-4)
    assert sizes == [8, 4, 4]
