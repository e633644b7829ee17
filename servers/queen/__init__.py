"""The queen daemon: routes operations, forwards to hives, schedules ``infer`` on workers."""

from ._config import CONFIG_KEYS as CONFIG_KEYS
from ._config import ConfigError as ConfigError
from ._config import HiveEntry as HiveEntry
from ._config import QueenConfig as QueenConfig
from ._config import hives_from_config as hives_from_config
from ._config import load_config_file as load_config_file
from ._config import parse_hive_flag as parse_hive_flag
from ._config import read_config as read_config
from ._config import validate_config as validate_config
from ._forward import ForwardFailed as ForwardFailed
from ._forward import forward_job as forward_job
from ._scheduler import NoWorker as NoWorker
from ._scheduler import WorkerEntry as WorkerEntry
from ._scheduler import WorkersBusy as WorkersBusy
from ._scheduler import WorkerTable as WorkerTable
from ._server import Queen as Queen
from ._server import make_registry as make_registry
from ._server import parse_queen_payload as parse_queen_payload
from ._server import parse_ssh_config as parse_ssh_config
from ._server import serve_queen as serve_queen

__all__ = [
    "CONFIG_KEYS",
    "ConfigError",
    "ForwardFailed",
    "HiveEntry",
    "NoWorker",
    "Queen",
    "QueenConfig",
    "WorkerEntry",
    "WorkerTable",
    "WorkersBusy",
    "forward_job",
    "hives_from_config",
    "load_config_file",
    "make_registry",
    "parse_hive_flag",
    "parse_queen_payload",
    "parse_ssh_config",
    "read_config",
    "serve_queen",
    "validate_config",
]
