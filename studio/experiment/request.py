"""The experiment's request: one dataclass shared by the CLI, the Curation tab and the tests."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pipelines.stats import METRICS

METRIC_KEYS = METRICS                       # pixel_auroc, pixel_ap, aupro, image_auroc
PRIMARY_METRIC = "pixel_ap"


@dataclass
class ExperimentRequest:
    data: str                               # MVTec-AD-layout category (roles decide what is scored)
    out: str
    synthetic: str | None = None            # an export: synthetic/<type> + synthetic_ground_truth/
    generate: str | Sequence[str] | None = None   # "perlin,cutpaste" | "all" | a list of names
    per_type: int = 10                      # synthetic defects per damage type and repeat
    repeats: int = 5
    seed: int = 0
    backbone: str = "efficientnet_lite0"
    coreset: float | None = None            # None: PatchCore's default
    positive_coreset: float | None = None   # positive bank's coreset; None: PatchCore's default (10 %)
    size: int = 256
    segmenter_steps: int = 150
    n_boot: int = 1000
    strength: float = 0.8                   # generator strength (perlin, cutpaste)
    feather: int = 4
    model: str | None = None                # pixel-inpaint model folder for every type (else picked per type)
    workspace: str | None = None            # its adapters/ runs come before the shipped models
                                            # (None: the studio's, $DEFECT_STUDIO_WORKSPACE or ./workspace)
    threads: int = 1                        # torch threads while it runs (0: leave torch's setting)
    folds: int | None = None                # cross-fitting folds; None: 3 when every type has ≥ 3
                                            # real defects, else 1 (the product's roles)

    def validate(self) -> None:
        if not self.synthetic and not self.generate:
            raise ValueError("nothing to compare: give --synthetic EXPORT_DIR and/or --generate "
                             "NAME[,NAME…]|all (e.g. perlin,cutpaste)")
        if not 1 <= int(self.repeats) <= 50:
            raise ValueError(f"repeats must be 1..50, got {self.repeats}")
        if self.generate and not 1 <= int(self.per_type) <= 500:
            raise ValueError(f"per-type must be 1..500, got {self.per_type}")
        if not 32 <= int(self.size) <= 1024:
            raise ValueError(f"size must be 32..1024 px, got {self.size}")
        if self.coreset is not None and not 0 < float(self.coreset) <= 1:
            raise ValueError(f"coreset must be a fraction in (0, 1], got {self.coreset}")
        if self.positive_coreset is not None and not 0 < float(self.positive_coreset) <= 1:
            raise ValueError(f"positive coreset must be a fraction in (0, 1], got {self.positive_coreset}")
        if int(self.threads) < 0:
            raise ValueError(f"threads must be ≥ 0 (0: torch's default), got {self.threads}")
        if self.folds is not None and not 1 <= int(self.folds) <= 10:
            raise ValueError(f"folds must be 1..10, got {self.folds}")
        if int(self.segmenter_steps) < 1 or int(self.n_boot) < 100:
            raise ValueError("segmenter steps must be ≥ 1 and bootstrap draws ≥ 100")

    @property
    def product(self) -> str:
        """The product the data is of: the data folder's name (as a trained run's product is the
        name of the folder it was trained on)."""
        return Path(self.data).expanduser().resolve().name

    def model_roots(self) -> tuple[Path, ...]:
        """Folders of the workspace's trained runs (:func:`studio.services.model_roots`; the
        workspace as every CLI command finds it, :meth:`studio.config.Settings.from_env`)."""
        from studio.config import Settings
        from studio.services import model_roots
        return model_roots(Settings.from_env(workspace=self.workspace).workspace)

    def generator_names(self) -> list[str]:
        g = self.generate
        if not g:
            return []
        items = [s.strip() for s in (g.split(",") if isinstance(g, str) else g) if s and s.strip()]
        return list(dict.fromkeys(items))

