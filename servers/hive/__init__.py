"""The hive daemon: worker processes it supervises and model files it downloads."""

from ._models import DownloadError as DownloadError
from ._models import ModelStore as ModelStore
from ._models import UnknownModel as UnknownModel
from ._server import Hive as Hive
from ._server import HiveConfig as HiveConfig
from ._server import make_registry as make_registry
from ._server import parse_hive_payload as parse_hive_payload
from ._server import serve_hive as serve_hive
from ._supervisor import UnknownWorker as UnknownWorker
from ._supervisor import WorkerProcess as WorkerProcess
from ._supervisor import WorkerStartError as WorkerStartError
from ._supervisor import WorkerSupervisor as WorkerSupervisor

__all__ = [
    "DownloadError",
    "Hive",
    "HiveConfig",
    "ModelStore",
    "UnknownModel",
    "UnknownWorker",
    "WorkerProcess",
    "WorkerStartError",
    "WorkerSupervisor",
    "make_registry",
    "parse_hive_payload",
    "serve_hive",
]
