"""The images a training epoch could not use: counted by kind of error and the first few
named with the error text a scan's error row gives, for the console and the model card.
Training never stops for them (`prepare.py` turns each into a row with its `skip_reason`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from mirror_core.errors import by_frequency, error_kind, most_frequent_kinds
from pipeline.progress import log

NAMED_SKIPS = 20  # skipped images a model card names per split (all are counted, by kind)


@dataclass
class Skips:
    """A split's skipped images in an epoch: how many, by kind of error, the first few named."""
    count: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    named: list[dict[str, str]] = field(default_factory=list)

    def add(self, uris, reasons) -> None:
        for uri, reason in zip(uris, reasons):
            if reason is None:
                continue
            self.count += 1
            kind = error_kind(reason)
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if len(self.named) < NAMED_SKIPS:
                self.named.append({"uri": uri, "reason": reason})

    def merge(self, other: Skips) -> Skips:
        for kind, n in other.by_kind.items():
            self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        self.count += other.count
        self.named = (self.named + other.named)[:NAMED_SKIPS]
        return self

    def of_all_workers(self) -> Skips:
        """Every data-parallel worker's skips together (each reads its own shard of the
        train split); a collective: every worker calls it."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        gathered: list[Skips | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self)
        return functools.reduce(Skips.merge, gathered[1:], gathered[0])

    def report(self) -> dict[str, Any]:
        return {"count": self.count, "by_kind": by_frequency(self.by_kind), "named": self.named}


def warn_skipped(train: Skips, val: Skips) -> None:
    """A WARNING per split with skipped images, naming one and why."""
    for split, skips in (("training", train), ("held-out", val)):
        if skips.count:
            example = skips.named[0]
            log.warning("%s %s images could not be used (%s), e.g. %s: %s; model_card.json names up to %d",
                        f"{skips.count:,}", split, most_frequent_kinds(skips.by_kind), example["uri"],
                        example["reason"], NAMED_SKIPS)
