"""The pre-training task under its earlier import path: `eva02.engine.tasks.mim` holds the task and
`eva02.engine.testing.export_backbone` the export of a pre-training checkpoint's backbone."""

from eva02.engine.config import TEACHER_KINDS, MimCfg  # noqa: F401
from eva02.engine.tasks.mim import (  # noqa: F401
    OPEN_CLIP_FILES,
    MaskedView,
    MimLoss,
    MimTask,
    build_mim_dataset,
    build_teacher,
    collate_masked,
    open_clip_weights,
    plain_folder,
)
from eva02.engine.testing import export_backbone  # noqa: F401
