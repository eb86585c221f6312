"""Time-lapse embryo videos (Gomez et al. 2022 layout) with clinical outcomes.

`EmbryoTimelapse` is the TFDS builder reading the dataset's original layout plus a clinic's
outcomes.csv; `synthesize` writes a synthetic dataset in that same layout whose development
(timing, fragmentation, arrest) depends on the outcome.
"""

from medjax_datasets.embryo_timelapse.embryo_timelapse import (
    BUILD_OPTIONS,
    OUTCOMES,
    PHASES,
    EmbryoDataError,
    EmbryoTimelapse,
)
from medjax_datasets.embryo_timelapse.synthetic import synthesize

__all__ = [
    "BUILD_OPTIONS",
    "OUTCOMES",
    "PHASES",
    "EmbryoDataError",
    "EmbryoTimelapse",
    "synthesize",
]
